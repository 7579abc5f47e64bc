"""Temporal stabilisation through the commands: the device run (torch-free, flags, JSON lines) and tune-temporal."""

from __future__ import annotations

import json

import cv2
import pytest

from device_helpers import disc_frame, make_bundle, run_device
from device_runtime.cli import main as device_main
from device_runtime.core.manifest import load_manifest
from device_runtime.core.temporal import TemporalParams
from export.cli import main as desktop_main


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    for i in range(8):
        frame = disc_frame(centre=(15 + 2 * i, 24))
        frame[::7, ::5] = 255  # features for the optical flow to follow
        cv2.imwrite(str(folder / f"scan_{i:02d}.png"), frame)
    return folder


def test_run_with_the_filter_is_torch_free_and_reports_change_and_resets(tmp_path, frames):
    bundle = make_bundle(tmp_path / "bundle")
    jsonl = tmp_path / "f.jsonl"
    result = run_device(tmp_path, "run", "--bundle", str(bundle), "--source", str(frames), "--jsonl", str(jsonl),
                        "--temporal", "on", "--temporal-alpha", "0.6", "--temporal-high", "0.7", "--temporal-low",
                        "0.3")
    assert result.returncode == 0, result.stderr
    assert "BLOCKED IMPORT" not in result.stderr
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["temporal_reset"] for r in records] == [True] + [False] * 7  # one stream of one scene
    assert records[0]["mask_change"] is None and all(0 <= r["mask_change"] <= 1 for r in records[1:])
    assert all(r["area_px"] > 0 for r in records)


def test_off_by_default_and_the_bundle_can_turn_it_on(tmp_path, frames):
    bundle = make_bundle(tmp_path / "bundle")
    jsonl = tmp_path / "off.jsonl"
    assert device_main(["run", "--bundle", str(bundle), "--source", str(frames), "--jsonl", str(jsonl),
                        "--quiet"]) == 0
    assert {json.loads(line)["temporal_reset"] for line in jsonl.read_text().splitlines()} == {None}
    manifest = load_manifest(bundle)
    manifest.temporal = TemporalParams(enabled=True)
    from device_runtime.core.manifest import write_manifest

    write_manifest(bundle, manifest)
    for flag, expected in (([], True), (["--temporal", "off"], None)):
        jsonl = tmp_path / f"on{len(flag)}.jsonl"
        assert device_main(["run", "--bundle", str(bundle), "--source", str(frames), "--jsonl", str(jsonl),
                            "--quiet", *flag]) == 0
        assert json.loads(jsonl.read_text().splitlines()[0])["temporal_reset"] is expected


@pytest.mark.parametrize("flags, needle", [
    (["--temporal-alpha", "1.5"], "temporal alpha must be a number in (0, 1]"),
    (["--temporal-low", "0.6", "--temporal-high", "0.4"], "must not exceed"),
    (["--temporal", "on", "--temporal-high", "0.4"], "must enclose T* = 0.5"),
])
def test_bad_temporal_flags_are_one_line(tmp_path, frames, capsys, flags, needle):
    bundle = make_bundle(tmp_path / "bundle")
    assert device_main(["run", "--bundle", str(bundle), "--source", str(frames), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


def test_tune_temporal_writes_the_chosen_settings_into_the_manifest(tmp_path, capsys):
    # the tiny model marks every pixel brighter than half the range: on speckled phantom frames that mask
    # flickers, and a filter that follows the motion can only help
    bundle = make_bundle(tmp_path / "bundle", size=(48, 48))
    assert desktop_main(["tune-temporal", "--bundle", str(bundle), "--phantom", "--sequences", "2", "--frames",
                         "6", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "2 phantom sequences of 6 frames, seed 1" in printed and "manifest.json" in printed
    manifest = load_manifest(bundle)  # still verifies: the model files are untouched
    record = manifest.metrics["temporal"]
    assert record["count"] == 2 and record["chosen"]["flicker"] <= record["plain"]["flicker"]
    assert record["chosen"]["dice"] >= record["plain"]["dice"] - 0.005
    chosen = manifest.temporal
    assert chosen.t_low <= manifest.threshold <= chosen.t_high
    assert chosen.enabled == (record["chosen"]["cut"] >= 0.5)


@pytest.mark.parametrize("argv, needle", [
    (["--phantom"], "give --run-dir RUN"),
    (["--bundle", "b", "--phantom", "--data", "d"], "not both"),
    (["--bundle", "b", "--phantom", "--min-flicker-cut", "2"], "--min-flicker-cut in [0, 1]"),
    (["--bundle", "{tmp}/nowhere", "--phantom"], "nowhere: bundle folder not found"),
    (["--run-dir", "{tmp}"], "split.json"),
])
def test_tune_temporal_bad_input_is_one_line(argv, needle, tmp_path, capsys):
    assert desktop_main(["tune-temporal", *[a.format(tmp=tmp_path) for a in argv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_candidates_enclose_t_star_and_include_the_plain_segmentation():
    from training.evaluation.temporal_tune import candidate_grid

    grid = candidate_grid(0.4)
    assert grid[0] == TemporalParams(enabled=True, alpha=1.0, t_high=0.4, t_low=0.4)
    assert len(set(grid)) == len(grid) == 105
    for threshold in (0.4, 0.1234, 0.9876):  # rounding for display never crosses T*
        assert all(p.thresholds(threshold) for p in candidate_grid(threshold))


def test_choose_takes_the_best_dice_among_the_near_steadiest():
    from training.evaluation.temporal_tune import choose

    p = [TemporalParams(enabled=True, alpha=a) for a in (1.0, 0.7, 0.5, 0.3)]
    plain = {"dice": 0.60, "flicker": 0.40}
    scored = [(p[0], {"dice": 0.60, "flicker": 0.40}),
              (p[1], {"dice": 0.58, "flicker": 0.100}),  # steadiest of all but loses Dice beyond the tolerance
              (p[2], {"dice": 0.61, "flicker": 0.120}),  # steadiest of the eligible
              (p[3], {"dice": 0.64, "flicker": 0.130})]  # within 10 % of it, and the best Dice: chosen
    params, score = choose(plain, scored, dice_tolerance=0.005, min_flicker_cut=0.5)
    assert params.alpha == 0.3 and params.enabled and score["cut"] == pytest.approx(1 - 0.13 / 0.4)
    params, _ = choose(plain, scored, dice_tolerance=0.005, min_flicker_cut=0.8)
    assert params.alpha == 0.3 and not params.enabled  # a 67 % cut is not the 80 % asked for
    params, _ = choose(plain, scored[:1], dice_tolerance=0.005, min_flicker_cut=0.5)
    assert params.alpha == 1.0 and not params.enabled  # nothing better than plain: the filter stays off


def test_eval_script_summary_by_hand():
    from conftest import load_script

    summarise = load_script("temporal_eval").summarise

    def side(dice, flicker, appear, vanish):
        return {"dice": dice, "flicker": flicker, "appear": appear, "vanish": vanish, "truth_appear": 1,
                "truth_vanish": 1, "truth_flicker": 0.02}

    rows = [{"plain": side(0.6, 0.4, 5, 5), "stable": side(0.7, 0.1, 1, 1), "resets": 0},
            {"plain": side(0.5, 0.2, 0, 0), "stable": side(0.5, 0.15, 1, 1), "resets": 2}]
    s = summarise(rows)
    assert s["plain"]["dice"] == pytest.approx(0.55) and s["stable"]["dice"] == pytest.approx(0.6)
    assert s["flicker_ratio"] == pytest.approx(0.125 / 0.3) and s["halved_share"] == 0.5
    assert s["truth_events"] == 4 and s["plain"]["events"] == 10 and s["stable"]["events"] == 4
    assert s["plain"]["event_error"] == pytest.approx((8 + 2) / 2) and s["stable"]["event_error"] == 0
    assert s["resets"] == 2 and s["dice_diff_ci"][0] <= 0.05 <= s["dice_diff_ci"][1]
