"""`nerveseg cv`: folds partition the frames by subject, each fold is a run scored through ONNX, re-runs skip
finished folds, and a RUN refuses a second config."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from conftest import load_script
from device_runtime.core.errors import InputError
from export.cli import main as cli_main
from export.workflows.cv import make_folds
from training.data.dataset import Sample, discover, group_by_prefix, split_samples
from training.data.synth import generate_phantom

cv_frames = load_script("cv_frames")


def _samples(subjects: dict[str, int]) -> list[Sample]:
    return [Sample(f"{s}_{f}", Path(f"{s}_{f}.png"), Path(f"m{s}_{f}.png"), s)
            for s, n in subjects.items() for f in range(1, n + 1)]


def test_folds_partition_the_frames_and_keep_subjects_together():
    samples = _samples({str(s): 3 + s % 4 for s in range(1, 21)})
    folds = make_folds(samples, 5, seed=0)
    tests = [s.name for f in folds for s in f["test"]]
    assert sorted(tests) == sorted(s.name for s in samples)  # every frame held out exactly once
    sizes = [len(f["test"]) for f in folds]
    assert max(sizes) - min(sizes) <= 6  # balanced to within one subject's frames
    for f in folds:
        sides = {side: {s.subject for s in f[side]} for side in ("train", "val", "test")}
        assert not (sides["train"] & sides["val"]) and not (sides["train"] & sides["test"]) and not (sides["val"] & sides["test"])
        assert len(f["train"]) + len(f["val"]) + len(f["test"]) == len(samples)
        assert 0.05 * len(samples) <= len(f["val"]) <= 0.2 * len(samples)
    assert make_folds(samples, 5, seed=0) == folds and make_folds(samples, 5, seed=1) != folds


def test_too_few_subjects_for_the_folds_is_refused():
    with pytest.raises(InputError, match="folds"):
        make_folds(_samples({"a": 5, "b": 5, "c": 5}), 3, seed=0)
    with pytest.raises(InputError, match="at least 2"):
        make_folds(_samples({"a": 5, "b": 5, "c": 5}), 1, seed=0)


def _paired_dataset(root: Path, subjects: int = 4, frames: int = 3) -> Path:
    images, masks, names = generate_phantom(subjects * frames, seed=5, size=(64, 64), frames_per_subject=frames)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for image, mask, name in zip(images, masks, names):  # names "<subject>_<frame>"
        cv2.imwrite(str(root / "images" / f"{name}.png"), image)
        cv2.imwrite(str(root / "masks" / f"{name}.png"), mask)
    return root


def test_group_by_prefix_reaches_the_normal_split(tmp_path):
    samples = discover(_paired_dataset(tmp_path / "data", subjects=5))
    assert all(s.subject is None for s in samples)  # paired folders know no subjects by themselves
    grouped = group_by_prefix(samples)
    assert {s.subject for s in grouped} == {"1", "2", "3", "4", "5"}
    splits = split_samples(grouped, 0)
    owners = [{s.subject for s in splits[side]} for side in ("train", "val", "test")]
    assert not (owners[0] & owners[1]) and not (owners[0] & owners[2]) and not (owners[1] & owners[2])


@pytest.mark.slow
def test_cv_runs_every_fold_resumes_and_refuses_another_config(tmp_path, capsys):
    data = _paired_dataset(tmp_path / "data", subjects=4)
    run = tmp_path / "cv"
    args = ["cv", "--data", str(data), "--folds", "2", "--recipe", "quick", "--group-by", "prefix", "--run-dir",
            str(run), "--input-size", "64", "64", "--steps", "1", "--batch-size", "2", "--device", "cpu"]
    assert cli_main([*args, "--only-folds", "2"]) == 0  # fold 2 now, fold 1 later (or on another machine)
    assert json.loads((run / "cv.json").read_text())["finished"] == 1 and not (run / "fold-1").exists()
    assert cli_main([*args, "--max-new-folds", "0"]) == 0  # nothing new allowed: fold 1 still waits
    assert json.loads((run / "cv.json").read_text())["finished"] == 1 and not (run / "fold-1").exists()
    assert cli_main(args) == 0
    report = json.loads((run / "cv.json").read_text())
    assert len(report["per_fold"]) == 2 and report["summary"]["folds"] == 2
    held_out = []
    for index in (1, 2):
        fold = run / f"fold-{index}"
        split = json.loads((fold / "split.json").read_text())
        held_out += [e["name"] for e in split["test"]]
        subjects = [{e["subject"] for e in split[side]} for side in ("train", "val", "test")]
        assert not (subjects[0] & subjects[2]) and not (subjects[1] & subjects[2])
        assert (fold / "bundle" / "manifest.json").is_file() and (fold / "test_metrics.json").is_file()
        result = json.loads((fold / "fold.json").read_text())
        assert result["epochs"] == 1 and result["cpu_s"] > 0
        assert 0 <= result["test_onnx"]["dice"] <= 1 and result["test_onnx"]["images"] == len(split["test"])
    assert sorted(held_out) == sorted(p.stem for p in (data / "images").iterdir())
    for name in ("cv.md", "cv.png"):
        assert (run / name).stat().st_size > 0
    assert "mean +- sd" in (run / "cv.md").read_text()

    # a second call redoes nothing: fold 1's checkpoint is untouched, both folds are read back
    before = (run / "fold-1" / "checkpoints" / "best.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert cli_main(args) == 0
    assert capsys.readouterr().out.count("finished before") == 2
    # nothing new allowed and nothing left: still a full report
    assert cli_main([*args, "--max-new-folds", "0"]) == 0
    assert (run / "fold-1" / "checkpoints" / "best.pt").stat().st_mtime_ns == before

    # an interrupted fold (no fold.json) is resumed from its checkpoint, not retrained
    (run / "fold-2" / "fold.json").unlink()
    assert cli_main(args) == 0
    assert json.loads((run / "fold-2" / "fold.json").read_text())["resumed"] is True

    changed = [a if a != "1" else "2" for a in args]  # --steps 2
    assert cli_main(changed) == 2
    assert "other settings (steps)" in capsys.readouterr().err

    # scripts/cv_frames.py re-scores the held-out frames through each fold's bundle: each fold's mean is its cv Dice
    assert cv_frames.main([str(run)]) == 0
    frames = json.loads((run / "frames.json").read_text())
    assert sorted(f["name"] for f in frames) == sorted(held_out)
    for fold in report["per_fold"]:
        dice = [f["dice"] for f in frames if f["fold"] == f"fold-{fold['fold']}"]
        assert sum(dice) / len(dice) == pytest.approx(fold["test_onnx"]["dice"], abs=1e-9)
    assert f"{len(held_out)} frames, mean Dice" in capsys.readouterr().out


def test_cv_refuses_a_fold_it_does_not_have(tmp_path, capsys):
    run = tmp_path / "cv"
    args = ["cv", "--data", str(_paired_dataset(tmp_path / "data", subjects=3)), "--folds", "3", "--recipe", "quick",
            "--run-dir", str(run), "--only-folds", "2", "4", "--device", "cpu"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "--only-folds 4: no such fold; there are 3 (1..3)" in err and "Traceback" not in err
    assert not run.exists()  # refused before anything was written


@pytest.mark.slow
def test_cv_pretrains_on_the_phantom_once_for_all_folds(tmp_path, capsys):
    data = _paired_dataset(tmp_path / "data", subjects=4)
    run = tmp_path / "cv"
    args = ["cv", "--data", str(data), "--folds", "2", "--recipe", "quick", "--group-by", "prefix", "--run-dir",
            str(run), "--input-size", "64", "64", "--steps", "1", "--batch-size", "2", "--device", "cpu",
            "--pretrained", "phantom", "--phantom-frames", "30"]
    assert cli_main(args) == 0
    stage = run / "phantom"
    assert (stage / "done.json").is_file() and not any((run / f"fold-{i}" / "phantom").exists() for i in (1, 2))
    assert capsys.readouterr().out.count("phantom pre-training:") == 1
    report = json.loads((run / "cv.json").read_text())
    assert report["pretraining"]["cpu_s"] > 0 and report["config"]["phantom_dir"] == str(stage)
    assert "Phantom pre-training (30 phantom frames" in (run / "cv.md").read_text()
    # a second call reads everything back and trains no phantom again
    stamp = (stage / "checkpoints" / "best.pt").stat().st_mtime_ns
    assert cli_main(args) == 0
    assert "phantom pre-training:" not in capsys.readouterr().out
    assert (stage / "checkpoints" / "best.pt").stat().st_mtime_ns == stamp

    # another cv naming that stage reuses it and says so, instead of claiming it cost nothing
    other = tmp_path / "other"
    other_args = [*args[:args.index("--run-dir") + 1], str(other), *args[args.index("--run-dir") + 2:],
                  "--phantom-dir", str(stage)]
    assert cli_main(other_args) == 0
    assert json.loads((other / "cv.json").read_text())["pretraining"] == {"reused": str(stage)}
    assert f"trained before this run, in {stage}" in (other / "cv.md").read_text()
    # and a second call of it (a cross-validation resumed) still does
    assert cli_main(other_args) == 0
    assert json.loads((other / "cv.json").read_text())["pretraining"] == {"reused": str(stage)}
    assert (stage / "checkpoints" / "best.pt").stat().st_mtime_ns == stamp


def test_a_refused_call_is_one_line_and_leaves_no_run(tmp_path, capsys):
    run = tmp_path / "cv"
    assert cli_main(["cv", "--data", str(tmp_path / "missing"), "--folds", "3", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and "Traceback" not in err[0]
    assert not run.exists()  # so a corrected call is not refused as "other settings"


def test_cv_frames_groups_the_lost_dice_and_refuses_a_folder_without_folds(tmp_path, capsys):
    frames = [{"fold": "fold-1", "name": str(i), "dice": d, "mask_area": a, "mask_pieces": k, "predicted_area": 1,
               "peak_probability": 0.9} for i, (d, a, k) in enumerate([(0.0, 10, 1), (0.5, 20, 2), (0.9, 30, 1)])]
    table = cv_frames.summary_table(frames)
    assert "3 frames, mean Dice 0.4667" in table
    assert "| Dice 0.00-0.05 | 1 | 0.0000 | 62% |" in table  # 1.0 of the 1.6 lost
    assert "| mask in two or more pieces | 1 | 0.5000 | 31% |" in table
    assert "misses (Dice < 0.05): peak probability fold-1/0 0.90" in table
    assert cv_frames.main([str(tmp_path)]) == 2
    assert "no finished fold" in capsys.readouterr().err
    assert not (tmp_path / "frames.json").exists()
