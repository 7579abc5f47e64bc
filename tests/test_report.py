"""`nerveseg report` and `nerveseg sweep`: rows, columns, figures, intervals, resume, bad input, strict JSON."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

EPOCHS = 3  # QAT epochs of the tiny sweep
REPORT_FILES = ("report.html", "report.md", "results.csv", "results.json")
COLUMNS = ("name", "kind", "status", "scored_by", "mean_weight_bits", "mean_activation_bits", "dice", "dice_ci_low",
           "dice_ci_high", "iou", "pixel_accuracy", "pooled_dice", "threshold", "fp32_bytes", "int8_bytes",
           "packed_bytes", "latency_ms", "latency_threads", "parity_mask_dice", "parity_max_prob_diff", "command")


def strict_json(path):
    """json.loads that refuses NaN / Infinity, which Python writes by default but JSON does not allow."""
    def refuse(token):
        raise ValueError(f"{path}: non-standard JSON constant {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


# ------------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_interval_of_known_cases():
    from export.report.stats import mean_ci, paired_diff_ci

    assert mean_ci(np.full(15, 0.7)) == pytest.approx((0.7, 0.7))
    # 400 frames, half at Dice 1 and half at 0: the mean's interval is 0.5 +- 1.96 * sqrt(0.25 / 400) = +-0.049
    low, high = mean_ci(np.repeat([0.0, 1.0], 200))
    assert low == pytest.approx(0.451, abs=0.006) and high == pytest.approx(0.549, abs=0.006)
    # a constant improvement on every frame is certain, whatever the frames' spread
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 0.9, 20)
    assert paired_diff_ci(base + 0.1, base) == pytest.approx((0.1, 0.1))
    assert mean_ci(base) == mean_ci(base)  # seeded: the same report twice prints the same interval
    with pytest.raises(ValueError):
        paired_diff_ci(base, base[:5])


# ------------------------------------------------------------------------------------------------ float + PTQ


@pytest.fixture(scope="module")
def float_run(tiny_run, tmp_path_factory):
    """A copy of the shared tiny run with its FP32 bundle (the report's float row and the PTQ come from it)."""
    from export.bundle.writer import export_bundle

    run_dir = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("qat", "report", "ptq", "bundle", "sweep.json"))
    export_bundle(run_dir / "checkpoints" / "best.pt", device="cpu")
    return run_dir


def test_no_qat_runs_gives_float_and_ptq_and_says_so(float_run):
    pytest.importorskip("export.report.ptq")
    from export.report.write import write_report

    out = write_report(float_run, threads=1, latency_runs=3)
    results = strict_json(out / "results.json")
    kinds = [row["kind"] for row in results["rows"]]
    assert kinds == ["float", "ptq"]
    assert any("No QAT runs" in note for note in results["notes"])
    assert "No QAT runs" in (out / "report.html").read_text()
    ptq = results["rows"][1]
    assert ptq["scored_by"].startswith("ONNX Runtime CPU") and 0 <= ptq["dice"] <= 1
    assert ptq["int8_bytes"] < results["rows"][0]["fp32_bytes"] / 3


def test_incomplete_qat_run_is_listed_not_fatal_and_report_is_replaced(float_run, tmp_path):
    from export.report.write import write_report

    run_dir = tmp_path / "run"
    shutil.copytree(float_run, run_dir)
    broken = run_dir / "qat" / "w4a4"
    broken.mkdir(parents=True)
    (broken / "config.toml").write_text('bits = "4"\nepochs = 3\n')
    (broken / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (run_dir / "report").mkdir(exist_ok=True)  # the previous test may have left one: either way it is replaced
    (run_dir / "report" / "stale.txt").write_text("from an older report")

    out = write_report(run_dir, threads=1, latency_runs=0)
    rows = {row["name"]: row for row in strict_json(out / "results.json")["rows"]}
    assert rows["w4a4"]["status"] == "incomplete" and rows["w4a4"]["dice"] is None
    assert "no test_metrics.json" in rows["w4a4"]["note"] and rows["w4a4"]["epochs"] == "1/3"
    assert not (out / "stale.txt").exists()  # the folder was swapped whole, not patched
    assert not list(run_dir.glob(".report*"))  # no staging folder left behind


def test_malformed_qat_file_is_one_line_error(float_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(float_run, run_dir)
    (run_dir / "qat" / "w8a8").mkdir(parents=True)
    (run_dir / "qat" / "w8a8" / "bits.json").write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "export.cli", "report", "--run-dir", str(run_dir),
                             "--latency-runs", "0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bits.json" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["report", "--run-dir", "{tmp}/missing"], "missing"),
    (["sweep", "--run-dir", "{tmp}/missing", "--bits", "9"], "--bits 9"),
    (["sweep", "--run-dir", "{tmp}/missing", "--bits", "w9a2"], "w9a2"),
    (["sweep", "--run-dir", "{tmp}/missing", "--bits", "8", "--learned", "-1"], "non-negative"),
    (["sweep", "--run-dir", "{tmp}/missing", "--bits", "8", "--grid", "arm"], "invalid choice: 'arm'"),
])
def test_bad_flags_are_one_line(argv, message, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = subprocess.run([sys.executable, "-m", "export.cli", *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_sweep_plan_names():
    from export.workflows.sweep import plan

    jobs = plan(["8", "W4A8"], ["0.25", "1.0"], ["4"])
    assert [j.name for j in jobs] == ["w8a8", "w4a8", "learned-0.25", "learned-1.0", "target-4"]
    assert jobs[2].bits == "learned" and jobs[2].bit_weight == 0.25 and jobs[4].target_bits == 4.0
    assert all(j.grid == "tensorrt" and "--grid" not in j.flags("RUN", None) for j in jobs)
    x86 = plan(["8"], ["0.25"], [], grid="x86")  # the names `nerveseg qat --grid x86` gives
    assert [j.name for j in x86] == ["w8a8-x86", "learned-0.25-x86"] and all(j.grid == "x86" for j in x86)
    assert x86[0].flags("RUN", 6) == "nerveseg qat --run-dir RUN --bits 8 --grid x86 --epochs 6 --name w8a8-x86"


# ------------------------------------------------------------------------------------------------ tiny sweep


@pytest.fixture(scope="module")
def swept(float_run, tmp_path_factory):
    """A tiny synthetic sweep: two QAT runs (W8A8 and learned lambda 0.25), 64x64, three epochs each (a learned
    run needs at least two: bits are learned, then frozen for the last epochs)."""
    pytest.importorskip("qat.run")
    pytest.importorskip("export.bundle.int8")
    from export.workflows.sweep import run_sweep

    run_dir = tmp_path_factory.mktemp("sweep") / "run"
    shutil.copytree(float_run, run_dir)
    out = run_sweep(run_dir, ["8"], ["0.25"], epochs=EPOCHS, device="cpu", threads=1, latency_runs=3)
    return run_dir, out


@pytest.mark.slow
def test_tiny_sweep_report_has_every_row_column_and_figure(swept):
    run_dir, out = swept
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    results = strict_json(out / "results.json")
    rows = {row["name"]: row for row in results["rows"]}
    assert set(rows) >= {"float", "w8a8", "learned-0.25"} and any(r["kind"] == "ptq" for r in rows.values())
    with open(out / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows) and set(COLUMNS) <= set(table[0])
    for name in ("w8a8", "learned-0.25"):
        row = rows[name]
        deployed = json.loads((run_dir / "qat" / name / "test_metrics.json").read_text()).get("selection", {})
        started = ", its start deployed" if deployed.get("chosen") == "start" else ""  # a fixed-bit run's choice
        assert row["status"] == "complete" and row["epochs"] == f"{EPOCHS}/{EPOCHS}{started}"
        assert 2 <= row["mean_weight_bits"] <= 8 and 2 <= row["mean_activation_bits"] <= 8
        assert row["dice_ci_low"] <= row["dice"] <= row["dice_ci_high"]
        assert row["delta_ci_low"] <= row["delta_dice_vs_float"] <= row["delta_ci_high"]
        assert row["command"].startswith("nerveseg qat") and f"--name {name}" in row["command"]
        if row["scored_by"].startswith("ONNX Runtime"):  # exported: sizes, latency and parity are there
            assert row["int8_bytes"] and row["packed_bytes"] and row["latency_ms"] > 0
            assert row["parity_mask_dice"] is not None
        else:
            assert row["scored_by"] == "fake-quant (PyTorch)" and row["note"]
    assert rows["w8a8"]["mean_weight_bits"] == pytest.approx(8.0)
    assert rows["float"]["latency_ms"] > 0 and rows["float"]["latency_threads"] == 1
    for figure in ("dice_vs_bits", "dice_vs_size", "dice_vs_latency", "threshold_curves", "bits_learned-0.25"):
        assert (out / "figures" / f"{figure}.png").is_file(), figure
    page = (out / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(list((out / "figures").glob("*.png")))
    assert not re.search(r"""(src|href)=['"](?!data:)""", page)  # nothing loaded from outside the page
    markdown = (out / "report.md").read_text()
    for name in rows:
        assert f"| {name} |" in markdown and name in page
    assert results["machine"]["libraries"]["onnxruntime"] and results["dataset"]["frames"]["test"] >= 1
    assert len(results["test_names"]) == results["dataset"]["frames"]["test"]
    for row in results["rows"]:  # per-frame Dice kept for pooling over folds (nerveseg cv-quant)
        if row["status"] == "complete":
            assert len(row["per_image_dice"]) == len(results["test_names"])
            assert np.mean(row["per_image_dice"]) == pytest.approx(row["dice"])
        # the fake-quant model's own per-frame Dice beside the INT8 file's: the file's departure, pooled later
        fake_quant = row["fake_quant_per_image_dice"]
        if row["name"] in ("w8a8", "learned-0.25"):
            assert len(fake_quant) == len(results["test_names"])
            if row["scored_by"] == "fake-quant (PyTorch)":
                assert fake_quant == row["per_image_dice"]
        else:
            assert fake_quant is None


@pytest.mark.slow
def test_interrupted_sweep_resumes_and_skips_finished_runs(swept, tmp_path, monkeypatch):
    import qat.run

    from export.workflows.sweep import run_sweep

    source, _ = swept
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    # learned-0.25 as an interrupted run leaves it: checkpoints written, never tuned and scored
    interrupted = run_dir / "qat" / "learned-0.25"
    for name in ("test_metrics.json",):
        (interrupted / name).unlink()
    shutil.rmtree(interrupted / "bundle", ignore_errors=True)
    finished_checkpoint = run_dir / "qat" / "w8a8" / "checkpoints" / "best.pt"
    before = finished_checkpoint.stat().st_mtime_ns
    calls = []
    real = qat.run.run_qat

    def spy(cfg, resume=False):
        calls.append((cfg.name, resume))
        return real(cfg, resume)

    monkeypatch.setattr(qat.run, "run_qat", spy)
    out = run_sweep(run_dir, ["8"], ["0.25"], epochs=EPOCHS, device="cpu", threads=1, latency_runs=0)
    assert calls == [("learned-0.25", True)]
    assert finished_checkpoint.stat().st_mtime_ns == before
    rows = {row["name"]: row for row in strict_json(out / "results.json")["rows"]}
    assert rows["learned-0.25"]["status"] == "complete"
    state = strict_json(run_dir / "sweep.json")
    assert state["runs"]["learned-0.25"]["status"] == "finished"


def test_a_parity_refusal_is_remembered_until_the_checkpoint_or_the_rule_changes(tmp_path, monkeypatch, capsys):
    import os

    import export.bundle.int8
    from device_runtime.core.errors import InputError
    from export.bundle.writer import ParityError
    from export.workflows.sweep import SweepState, export_finished, gate_rule

    qat_dir = tmp_path / "qat" / "w4a8"
    (qat_dir / "checkpoints").mkdir(parents=True)
    (qat_dir / "test_metrics.json").write_text("{}")
    checkpoint = qat_dir / "checkpoints" / "best.pt"
    checkpoint.write_bytes(b"weights")
    calls, refusal = [], [ParityError("no INT8 bundle: every INT8 file departs ...")]

    def refusing_export(run_dir, name, device):
        calls.append(name)
        raise refusal[0]

    monkeypatch.setattr(export.bundle.int8, "export_int8_bundle", refusing_export)
    for _ in range(2):  # the second sweep remembers: same checkpoint, same rule
        export_finished(tmp_path, "cpu", SweepState(tmp_path, "sweep"))
    assert calls == ["w4a8"] and "refused earlier" in capsys.readouterr().err
    for former in ("fixed bound", "noise-floor gate"):  # refusals by former rules (sweep.json of an older nerveseg)
        state = SweepState(tmp_path, "sweep")
        state.update("w4a8", export_refused_for=state.data["runs"]["w4a8"]["export_refused_for"].replace(
            gate_rule(), former))
        export_finished(tmp_path, "cpu", SweepState(tmp_path, "sweep"))
    assert calls == ["w4a8"] * 3
    os.utime(checkpoint, ns=(1, 1))  # a retrained checkpoint
    refusal[0] = InputError("best.pt: not found")  # not a parity verdict: tried again every time
    export_finished(tmp_path, "cpu", SweepState(tmp_path, "sweep"))
    export_finished(tmp_path, "cpu", SweepState(tmp_path, "sweep"))
    assert calls == ["w4a8"] * 5
    assert strict_json(tmp_path / "sweep.json")["runs"]["w4a8"]["export_error"] == "not exported: best.pt: not found"


def test_uniform_curve_takes_one_run_per_bitwidth_the_plain_name_first():
    from export.report.write import uniform_curve_at
    from export.report.rows import Row, uniform_curve

    def row(name, bits, dice):
        return Row(name=name, kind="uniform", mean_weight_bits=bits, metrics={"dice": dice})

    rows = [row("w8a8-x86", 8.0, 0.40), row("w8a8", 8.0, 0.48), row("w8a8-p99.99", 8.0, 0.50), row("w4a4", 4.0, 0.20)]
    assert [r.name for r in uniform_curve(rows, lambda r: r.mean_weight_bits)] == ["w4a4", "w8a8"]
    assert uniform_curve_at(rows, 6.0) == pytest.approx(0.34)  # halfway between w4a4 and w8a8, not a zigzag
    variants_only = [r for r in rows if r.name != "w8a8"]
    assert [r.name for r in uniform_curve(variants_only, lambda r: r.mean_weight_bits)] == ["w4a4", "w8a8-p99.99"]


def test_a_learned_run_is_judged_against_the_fixed_run_with_its_activations_and_the_nearest_weight_bits():
    from export.report.write import add_intervals, checks
    from export.report.rows import Row

    def row(name, kind, w, a, dice, frames):
        return Row(name=name, kind=kind, mean_weight_bits=w, mean_activation_bits=a, metrics={"dice": dice},
                   per_image=np.array(frames))

    rows = [row("float", "float", 32.0, 32.0, 0.84, [0.8, 0.88]),
            row("w8a8", "uniform", 8.0, 8.0, 0.836, [0.8, 0.872]),
            row("w4a4", "uniform", 4.0, 4.0, 0.70, [0.6, 0.8]),
            row("w4a8", "mixed", 4.0, 8.0, 0.78, [0.7, 0.86]),
            row("learned-a8-i4-t4", "learned", 3.94, 8.0, 0.83, [0.79, 0.87])]
    line = next(text for text in checks(rows) if text.startswith("learned-a8-i4-t4:"))
    # 3.94 bits lie below the uniform (W = A) curve's range; W4A4 quantizes the activations too, W4A8 is like for like
    assert "outside the uniform runs' range" in line
    # the verdict is the paired interval's: above it only where every resample is (+0.09 and +0.01 per frame)
    assert "ABOVE the fixed-bits run with the nearest mean weight bits, w4a8 (4.00 bits" in line
    assert "paired difference +0.0500" in line
    verdict = next(text for text in checks(rows) if text.startswith("Learned run learned-a8-i4-t4"))
    assert verdict.endswith("-0.0100; within 0.01 by its point estimate (no paired frames).")  # no intervals yet
    add_intervals(rows)  # as collect() does before the checks: the margin lines read the row's interval vs float
    eight = next(text for text in checks(rows) if text.startswith("w8a8:"))  # 0.0 and -0.008 per frame
    assert eight == ("w8a8: -0.0040 Dice vs float, paired 95 % CI [-0.0080, +0.0000]; UNDECIDED at 0.005: the "
                     "interval reaches both sides of -0.005.")
    worse = rows[:4] + [row("learned-a8-i4-t4", "learned", 3.94, 8.0, 0.75, [0.65, 0.8])]
    assert "BELOW the fixed-bits run" in next(t for t in checks(worse) if t.startswith("learned-a8-i4-t4:"))
    mixed = rows[:4] + [row("learned-a8-i4-t4", "learned", 3.94, 8.0, 0.785, [0.75, 0.82])]  # +0.05 and -0.04
    assert "LEVEL WITH the fixed-bits run" in next(t for t in checks(mixed) if t.startswith("learned-a8-i4-t4:"))
    unpaired = rows[:4] + [Row(name="learned-a8-i4-t4", kind="learned", mean_weight_bits=3.94, mean_activation_bits=8.0,
                               metrics={"dice": 0.79})]  # no per-frame Dice: the point estimates decide
    line = next(t for t in checks(unpaired) if t.startswith("learned-a8-i4-t4:"))
    assert "AT LEAST AS GOOD AS the fixed-bits run" in line and "paired" not in line
    # equally near: the W4A8 run with the learned run's schedule and grid, not the first listed
    schedule = {"grid": "x86", "epochs": 12, "lr_weights": 1e-4}
    rows[3].settings = {**schedule, "epochs": 6, "bits": "W4A8"}
    rows.insert(4, row("w4a8-e12", "mixed", 4.0, 8.0, 0.80, [0.75, 0.85]))
    rows[4].settings = {**schedule, "bits": "W4A8", "name": "w4a8-e12"}
    rows[5].settings = {**schedule, "bits": "learned-a8", "target_bits": 4.0, "initial_bits": 4, "bit_epochs": 4}
    line = next(text for text in checks(rows) if text.startswith("learned-a8-i4-t4:"))
    assert "nearest mean weight bits, w4a8-e12 (4.00 bits" in line


def test_a_margin_verdict_is_its_paired_intervals_so_a_point_estimate_at_the_margin_does_not_flip_it():
    """The demo's W8A8 row sat at -0.0025, -0.0051 and -0.0048 from float over three seeds: by the point estimate
    within 0.005 on two and not on the third. Each interval reaches both sides of the margin: the same word on all."""
    from export.report.write import within_margin

    seeds = [(-0.0025, (-0.0109, 0.0085)), (-0.0051, (-0.0101, -0.0009)), (-0.0048, (-0.0107, -0.0001))]
    words = {within_margin(delta, interval, 0.005).split(":")[0] for delta, interval in seeds}
    assert words == {"UNDECIDED at 0.005"}
    assert within_margin(-0.002, (-0.004, 0.001), 0.005).startswith("WITHIN 0.005: the whole interval is above")
    assert within_margin(-0.02, (-0.03, -0.006), 0.005).startswith("NOT WITHIN 0.005: the whole interval is below")
    assert within_margin(-0.0051, None, 0.005) == "NOT within 0.005 by its point estimate (no paired frames)"
    assert within_margin(-0.0049, None, 0.005) == "within 0.005 by its point estimate (no paired frames)"


def test_each_learned_run_at_4_bits_or_fewer_has_its_own_margin_line_read_off_its_interval():
    from export.report.write import add_intervals, checks
    from export.report.rows import Row

    frames = np.linspace(0.5, 0.9, 40)
    rows = [Row(name="float", kind="float", mean_weight_bits=32.0, mean_activation_bits=32.0,
                metrics={"dice": frames.mean()}, per_image=frames)]
    for name, bits, shift in (("close", 3.9, -0.002), ("far", 3.95, -0.05), ("wide", 4.0, 0.0), ("big", 6.0, -0.3)):
        wobble = np.where(np.arange(40) % 2, 0.06, -0.06) if name == "wide" else 0.0  # +-0.06 a frame: a wide interval
        per_image = frames + shift + wobble
        rows.append(Row(name=name, kind="learned", mean_weight_bits=bits, mean_activation_bits=8.0,
                        metrics={"dice": per_image.mean()}, per_image=per_image))
    add_intervals(rows)
    lines = {text.split()[2]: text for text in checks(rows) if text.startswith("Learned run ")}
    assert sorted(lines) == ["close", "far", "wide"]  # 6 bits is not a <= 4-bit run
    assert lines["close"].endswith("-0.0020, paired 95 % CI [-0.0020, -0.0020]; WITHIN 0.01: the whole interval is "
                                   "above -0.01.")
    assert "NOT WITHIN 0.01" in lines["far"] and "UNDECIDED at 0.01" in lines["wide"]
    rows = [rows[0], rows[-1]]
    assert any(text.endswith("NO, no complete learned run reached <= 4.0 mean weight bits.") for text in checks(rows))


def test_the_report_command_of_a_learned_run_reproduces_its_schedule():
    from pathlib import Path

    from export.report.rows import qat_command

    config = {"bits": "learned-a8", "bit_weight": 0.25, "target_bits": 4.0, "initial_bits": 4, "epochs": 6,
              "bit_epochs": 2, "grid": "x86", "activation_percentile": 99.99}
    command = qat_command(Path("runs/edge"), "i4-b2", config)
    for flag in ("--bits learned-a8", "--target-bits 4", "--initial-bits 4", "--epochs 6", "--bit-epochs 2",
                 "--grid x86", "--name i4-b2"):
        assert flag in command, (flag, command)
    assert "keep-start" not in command  # learned bits have no start to keep


def test_the_report_command_of_a_fixed_bit_run_says_which_model_it_deploys():
    from pathlib import Path

    from export.report.rows import qat_command

    def command(config):
        return qat_command(Path("runs/edge"), "run", config)

    # the default for the bits (on with 8-bit weights, off below) names no flag; the other value does
    for config in ({"bits": "8", "keep_start": True, "epochs": 6}, {"bits": "W4A8", "keep_start": False},
                   {"bits": "W4A8"}):  # the last: from before the setting, which deployed the trained model
        assert "keep-start" not in command(config), config
    for config in ({"bits": "8", "keep_start": False}, {"bits": "W8A4"}):
        assert "--no-keep-start" in command(config), config
    assert "--keep-start" in command({"bits": "3", "keep_start": True})


# ------------------------------------------------------------------------------------------------ the page and figures


def _crowded_rows():
    """A sweep's worth of rows, learned runs crowded at 3.75 bits and 0.47 Dice (issue 33's unreadable figure)."""
    from export.report.rows import Row

    def row(name, kind, w, a, dice, onnx=True, size=None):
        return Row(name=name, kind=kind, mean_weight_bits=w, mean_activation_bits=a, metrics={"dice": dice},
                   dice_ci=(max(0.0, dice - 0.1), dice + 0.1), packed_bytes=size or w * 6.5e5,
                   onnx="graph.onnx" if onnx else None,
                   scored_by="ONNX Runtime CPU, model.int8.cpu.onnx" if onnx else "fake-quant (PyTorch)")

    rows = [row("float", "float", 32.0, 32.0, 0.48, size=2e7)]
    rows += [row(f"w{b}a{b}", "uniform", b, b, d, onnx=b >= 6) for b, d in ((8, .45), (6, .44), (5, 0), (4, .23),
                                                                           (3, 0), (2, 0))]
    rows += [row("w8a8-p99.99", "uniform", 8, 8, .48), row("w4a8", "mixed", 4, 8, .44),
             row("w4a8-x86", "mixed", 4, 8, .47)]
    rows += [row(f"learned-a8-i4-t4{suffix}", "learned", 3.75 + i / 100, 8, .47 + i / 500, onnx=i == 0)
             for i, suffix in enumerate(("", "-p99", "-p99.99", "-e12", "-d0.5", "-x86"))]
    rows.append(row("ORT PTQ (Percentile)", "ptq", 8, 8, .48))
    return rows


def test_point_labels_never_overlap_and_every_point_is_numbered_as_its_row():
    from matplotlib.text import Text

    from export.report.figures import dice_vs_bits_figure
    from export.report.page import numbered

    rows = _crowded_rows()
    numbers = numbered(rows)
    fig, labels = dice_vs_bits_figure(rows, numbers)
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    boxes = [label.get_window_extent(renderer) for label in labels]
    assert sorted(int(label.get_text()) for label in labels) == sorted(numbers[r.name] for r in rows[1:])
    frame = ax.get_window_extent(renderer)
    for i, box in enumerate(boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        assert not any(box.overlaps(other) for other in boxes[i + 1:]), labels[i].get_text()
    # no names on the axes: they live in the table of points beside them
    names = {r.name for r in rows}
    assert not [c for c in ax.findobj(Text) if c.get_text() in names]
    key = next(t.get_text() for t in fig.texts if t.get_text().startswith(" #"))
    assert all(r.name in key for r in rows) and "fake-quant" in key
    # the uniform curve joins one run per bitwidth: w8a8 (not its variant w8a8-p99.99) at 8 bits
    curve = next(line for line in ax.lines if line.get_linestyle() == "-" and line.get_marker() in ("None", None, "")
                 and len(line.get_xdata()) > 2)
    assert list(curve.get_xdata()) == [2, 3, 4, 5, 6, 8] and curve.get_ydata()[-1] == pytest.approx(0.45)


def test_log_axes_are_labelled_in_plain_numbers():
    from matplotlib.figure import Figure

    from export.report.figures import plain_log_axis

    ax = Figure().add_subplot()
    plain_log_axis(ax.xaxis)
    ax.set_xlim(0.4, 30)
    labels = [ax.xaxis.get_major_formatter()(v, 0) for v in ax.xaxis.get_major_locator().tick_values(0.4, 30)]
    assert {"0.5", "1", "2", "5", "10", "20"} <= set(labels)
    assert not any("^" in label or "e" in label for label in labels)


def test_the_page_fits_a_laptop_says_how_each_row_was_scored_and_tables_the_machine():
    import html

    from export.report.page import DETAILS, MAIN, numbered, render_html, render_markdown, scoring_sentence, status_text

    rows = _crowded_rows()
    rows[3].export_status = "INT8 export refused"  # w5a5, as the sweep records a parity refusal
    rows[3].onnx, rows[3].scored_by = None, "fake-quant (PyTorch)"
    from export.report.write import row_record

    numbers = numbered(rows)
    records = [{**row_record(r, 2), "number": numbers[r.name]} for r in rows]
    env = {"date": "2026-12-04", "cpu": "AMD EPYC", "cpu_count": 2, "os": "Linux", "python": "3.11",
           "libraries": {"onnxruntime": "1.32.0"}, "onnxruntime_threads": 2}
    data = {"source": "usgra-seg", "mask_label": 1, "frames": {"train": 163, "val": 20, "test": 21},
            "architecture": "mobilenet_v3_large", "input_size": [320, 320], "recipe": "small", "seed": 0}
    page = render_html("t", records, [], [], [], [], env, data)
    assert len(MAIN) <= 10 and len(DETAILS) > len(MAIN)  # the rest of each row is folded, not off-screen
    assert page.count("<details>") == 1 and "<pre>" not in page and "<th class=l>libraries</th>" in page
    assert status_text(records[3]) == "complete, INT8 export refused" and "class=refused" in page
    sentence = scoring_sentence(records)
    assert html.escape(sentence) in page
    assert "w8a8" in sentence.split(";")[0] and "w5a5" in sentence.split(";")[1] and "fake-quant" in sentence
    assert "| 1 | float |" in render_markdown("t", records, [], [], [], [], env, data)


def test_the_console_table_keeps_its_columns_under_a_long_run_name(capsys):
    from export.report.rows import Row
    from export.report.write import print_table

    rows = [Row(name="float", kind="float", mean_weight_bits=32.0, mean_activation_bits=32.0, metrics={"dice": 0.64},
                scored_by="ONNX Runtime CPU, model.fp32.onnx"),
            Row(name="learned-44-from-alloc-x86-long", kind="learned", mean_weight_bits=3.97, mean_activation_bits=3.99,
                metrics={"dice": 0.645}, scored_by="ONNX Runtime CPU, model.int8.cpu.onnx")]
    print_table(rows, 1)
    lines = capsys.readouterr().out.splitlines()
    assert len({lines[0].index("scored by")} | {line.index("ONNX") for line in lines[1:]}) == 1
    weight_bits_ends = [lines[0].index("W bits") + 6, lines[1].index("32.00") + 5, lines[2].index("3.97") + 4]
    assert len(set(weight_bits_ends)) == 1
