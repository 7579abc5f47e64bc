"""A fixed-bit QAT run deploys its start (the grid alone, at float's T*) unless validation prefers the trained model
beyond noise: the rule on known inputs, which runs have a start, and the files of a tiny W8A8 run either way."""

import json

import numpy as np
import pytest
import torch

import qat.run
from export.report.rows import qat_row
from qat.checkpoint import choose, has_start, read_qat_checkpoint
from qat.config import QatConfig
from qat.run import format_summary, run_qat
from training.checkpoint import load_model, read_checkpoint

UNIFORM = dict(bits="8", epochs=2, observe_frames=8, batch_size=12, device="cpu")


def test_the_trained_model_wins_only_beyond_noise():
    rng = np.random.default_rng(0)
    start = rng.uniform(0.5, 0.9, 40)
    assert choose(start + 0.05, start, keep_start=True)["chosen"] == "trained"  # every frame better
    noisy = start + rng.normal(0.0, 0.1, 40)  # as often worse as better
    decision = choose(noisy, start, keep_start=True)
    low, high = decision["val_difference_ci95"]
    assert low < 0 < high and decision["chosen"] == "start"
    assert choose(noisy, start, keep_start=False)["chosen"] == "trained"  # the rule off: as before
    assert choose(start - 0.05, start, keep_start=True)["chosen"] == "start"


@pytest.mark.parametrize("settings, expected", [
    (dict(bits="8"), True), (dict(bits="W4A8"), True), (dict(bits="W4A8", weight_allocation="sensitivity"), True),
    (dict(bits="4", hold_fragile=2), True), (dict(bits="learned-a8"), False), (dict(bits="learned"), False),
    (dict(bits="4", bit_schedule="6@2,4@3", epochs=3), False)])
def test_a_start_exists_where_the_first_epoch_trains_at_the_deployed_bits(settings, expected):
    assert has_start(QatConfig(**settings)) is expected


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(value, b["model"][key]) for key, value in a["model"].items())


@pytest.fixture(scope="module")
def start_run(tiny_run):
    """A W8A8 run whose validation found no gain beyond noise (forced, whatever the tiny data say): it keeps its
    start."""
    real = qat.run.choose
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qat.run, "choose", lambda *a: {**real(*a), "chosen": "start"})
        return run_qat(QatConfig(run_dir=str(tiny_run), name="w8-start", keep_start=True, **UNIFORM))


def test_a_run_that_keeps_its_start_deploys_it_at_floats_threshold(tiny_run, start_run, capsys):
    qat_dir = start_run
    checkpoints = qat_dir / "checkpoints"
    best, start, trained = (read_qat_checkpoint(checkpoints / n) for n in ("best.pt", "start.pt", "trained.pt"))
    assert best["selected"] == "start" and _same_weights(best, start) and not _same_weights(best, trained)
    float_checkpoint = read_checkpoint(tiny_run / "checkpoints" / "best.pt")
    assert best["threshold"] == float_checkpoint["threshold"] and best["morphology"] == float_checkpoint["morphology"]
    assert json.loads((qat_dir / "threshold.json").read_text())["threshold"] == float_checkpoint["threshold"]
    metrics = json.loads((qat_dir / "test_metrics.json").read_text())
    selection = metrics["selection"]
    assert selection["chosen"] == "start" and metrics["dice"] == pytest.approx(selection["test_start"]["dice"])
    assert set(selection["test_trained"]["per_image"]) == set(metrics["per_image"])
    record = metrics["postprocessing"]  # a kept start is deployed at float's rule: the three rules are one
    assert record["deployed"]["per_image"] == record["float rule"]["per_image"] == metrics["per_image"]
    assert record["float morphology"]["threshold"] == float_checkpoint["threshold"]
    assert "deployed: the start model" in format_summary(qat_dir) and "the float run's T*" in format_summary(qat_dir)
    assert qat_row(tiny_run, qat_dir, None, {}).epochs == "2/2, its start deployed"  # the report says so

    # scored again (a resume of the finished run): best.pt holds the start, trained.pt the loop's best, unchanged
    trained_bytes = (checkpoints / "trained.pt").read_bytes()
    run_qat(QatConfig(run_dir=str(tiny_run), name="w8-start", keep_start=True, **UNIFORM), resume=True)
    assert (checkpoints / "trained.pt").read_bytes() == trained_bytes
    assert _same_weights(read_qat_checkpoint(checkpoints / "best.pt"), start)
    capsys.readouterr()


def test_a_finished_run_is_chosen_again_under_the_keep_start_given_on_resume(tiny_run, start_run, capsys):
    from export.cli import main as cli
    from training.loop import exclusive_run

    checkpoints, config = start_run / "checkpoints", start_run / "config.toml"
    trained = read_qat_checkpoint(checkpoints / "trained.pt")
    resume = ["qat", "--run-dir", str(tiny_run), "--bits", "8", "--name", "w8-start", "--resume", "--device", "cpu"]
    with exclusive_run(start_run):  # another process holds the run: refused, and its config is left as it was
        assert cli(resume + ["--no-keep-start"]) == 2
    assert "keep_start = true" in config.read_text()
    assert cli(resume + ["--no-keep-start"]) in (0, None)
    assert "keep_start = false" in config.read_text()  # the run's config says what it deployed
    assert json.loads((start_run / "test_metrics.json").read_text())["selection"]["chosen"] == "trained"
    assert _same_weights(read_qat_checkpoint(checkpoints / "best.pt"), trained)
    assert cli(resume) in (0, None)  # no flag: the run's own setting stands
    assert "keep_start = false" in config.read_text()
    assert cli(resume + ["--keep-start"]) in (0, None)  # and back: the start again, the trained model kept
    assert "keep_start = true" in config.read_text()
    assert _same_weights(read_qat_checkpoint(checkpoints / "best.pt"), read_qat_checkpoint(checkpoints / "start.pt"))
    assert _same_weights(read_qat_checkpoint(checkpoints / "trained.pt"), trained)
    capsys.readouterr()


def test_a_kept_start_exports_to_int8_files_that_pass_the_gate_at_floats_threshold(tiny_run, start_run):
    pytest.importorskip("onnxruntime")
    from export.bundle.int8 import export_int8_bundle

    bundle, manifest = export_int8_bundle(tiny_run, start_run.name, device="cpu")
    parity = manifest.metrics["parity"]
    passed = {name: result["gate"]["passed"] for name, result in parity.items() if "gate" in result}
    assert len(passed) == 2 and all(passed.values()), passed  # the TensorRT form and the x86 file
    float_checkpoint = read_checkpoint(tiny_run / "checkpoints" / "best.pt")
    assert manifest.threshold == pytest.approx(float_checkpoint["threshold"])


@pytest.fixture(scope="module")
def trained_run(tiny_run):
    """A W8A8 run with the start rule off: it deploys its trained model at its own re-tuned rule."""
    return run_qat(QatConfig(run_dir=str(tiny_run), name="w8-trained", keep_start=False, **UNIFORM))


def test_with_keep_start_off_the_trained_model_is_deployed_at_its_own_threshold_and_both_are_scored(trained_run):
    qat_dir = trained_run
    checkpoints = qat_dir / "checkpoints"
    best, trained = read_qat_checkpoint(checkpoints / "best.pt"), read_qat_checkpoint(checkpoints / "trained.pt")
    assert best["selected"] == "trained" and _same_weights(best, trained)
    assert best["threshold"] == json.loads((qat_dir / "threshold.json").read_text())["threshold"]
    selection = json.loads((qat_dir / "test_metrics.json").read_text())["selection"]
    assert selection["chosen"] == "trained" and "keep_start off" in selection["rule"]
    assert set(selection["test_start"]["per_image"]) == set(selection["test_trained"]["per_image"])  # both scored


def test_the_deployed_model_is_recorded_under_three_post_processing_rules(tiny_run, trained_run):
    """The trained model at its own rule (as deployed), at its T* with float's morphology, and at float's rule. The
    float run's rule is replaced by ones whose masks are known without the model: T 0 and no clean-up marks every
    pixel (Dice 2g / (g + N) for g nerve pixels of N), a smallest component larger than the frame marks none."""
    from training.stages import split_arrays

    _, float_checkpoint, float_cfg = load_model(tiny_run / "checkpoints" / "best.pt")
    _, masks, names = split_arrays(tiny_run, "test", float_cfg)
    nerve = dict(zip(names, masks.reshape(len(masks), -1).sum(axis=1)))
    pixels = masks[0].size
    everything = {n: 2 * g / (g + pixels) for n, g in nerve.items()}
    nothing = {n: float(g == 0) for n, g in nerve.items()}
    plain = {"open_radius": 0, "close_radius": 0, "min_area": 0, "fill_holes": False}
    emptying = {**plain, "min_area": 10 ** 6}
    for morphology in (plain, emptying):
        qat.run.finish(trained_run, float_cfg, torch.device("cpu"),  # finish() scores the finished run again
                       {**float_checkpoint, "morphology": morphology, "threshold": 0.0})
        metrics = json.loads((trained_run / "test_metrics.json").read_text())
        record, rule = metrics["postprocessing"], json.loads((trained_run / "threshold.json").read_text())
        assert list(record) == ["deployed", "float morphology", "float rule"]
        deployed, float_morphology, float_rule = record.values()
        assert deployed["per_image"] == metrics["per_image"] and deployed["dice"] == pytest.approx(metrics["dice"])
        assert (deployed["threshold"], deployed["morphology"]) == (rule["threshold"], rule["morphology"])
        assert deployed["validation_dice"] == pytest.approx(rule["validation"]["dice"])
        assert (float_morphology["threshold"], float_morphology["morphology"]) == (rule["threshold"], morphology)
        assert (float_rule["threshold"], float_rule["morphology"]) == (0.0, morphology)
        expected = everything if morphology == plain else nothing
        assert float_rule["per_image"] == pytest.approx(expected, rel=1e-3)
        assert float_rule["dice"] == pytest.approx(np.mean(list(expected.values())), rel=1e-3)
    assert float_morphology["per_image"] == nothing  # the last one: float's emptying clean-up at the model's own T*


def test_a_learned_run_has_no_start_and_no_selection(qat_learned_run):
    assert not (qat_learned_run / "checkpoints" / "start.pt").exists()
    assert "selection" not in json.loads((qat_learned_run / "test_metrics.json").read_text())


@pytest.fixture(scope="module")
def qat_learned_run(tiny_run):
    return run_qat(QatConfig(run_dir=str(tiny_run), name="learned-nostart", epochs=2, bit_epochs=1, observe_frames=8,
                             batch_size=12, device="cpu"))


def test_keep_start_is_on_by_default_with_8_bit_weights_off_below_and_the_flag_chooses(tiny_run, capsys):
    from export.cli import main as cli
    from qat.config import QatConfig, build_qat_config, load_qat_config, to_toml

    for recipe in ("quick", "small"):  # the command line's path: no flag given (None) keeps the default
        for bits, default in (("8", True), ("W8A4", True), ("W4A8", False), ("3", False)):
            assert build_qat_config(recipe, run_dir=str(tiny_run), bits=bits, keep_start=None).keep_start is default
        assert build_qat_config(recipe, run_dir=str(tiny_run), bits="W4A8", keep_start=True).keep_start is True
    written = tiny_run / "w4a8-config.toml"  # resolved when made: the saved config says which, and reads back so
    written.write_text(to_toml(QatConfig(run_dir=str(tiny_run), bits="W4A8")))
    assert "keep_start = false" in written.read_text() and load_qat_config(written).keep_start is False
    assert cli(["qat", "--run-dir", str(tiny_run), "--bits", "8", "--epochs", "1", "--no-keep-start",
                "--name", "w8-flag", "--device", "cpu"]) in (0, None)
    assert "keep_start = false" in (tiny_run / "qat" / "w8-flag" / "config.toml").read_text()
    capsys.readouterr()


def test_pool_selection_pools_the_candidates_over_folds(tmp_path, capsys):
    from conftest import load_script

    pool = load_script("pool_selection")
    for fold, chosen in ((1, "start"), (2, "trained")):
        names = [f"f{fold}-{i}" for i in range(4)]
        qat_dir = tmp_path / f"fold-{fold}" / "qat" / "w8"
        qat_dir.mkdir(parents=True)
        floats = dict(zip(names, [0.6, 0.7, 0.8, 0.5]))
        start = {n: d - 0.01 for n, d in floats.items()}
        trained = {n: d - 0.05 for n, d in floats.items()}
        (tmp_path / f"fold-{fold}" / "test_metrics.json").write_text(json.dumps({"per_image": floats}))
        (qat_dir / "test_metrics.json").write_text(json.dumps({
            "per_image": start if chosen == "start" else trained,
            "selection": {"chosen": chosen, "test_start": {"per_image": start},
                          "test_trained": {"per_image": trained}}}))
    assert pool.main([str(tmp_path), "--qat", "w8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert "| 0.6500 |" in rows["float"] and "-0.0100 [-0.010, -0.010]" in rows["start"]
    assert "-0.0500 [-0.050, -0.050]" in rows["trained"]
    assert "| 0.6200 | -0.0300 [" in rows["deployed"] and "| +0.0200 [" in rows["deployed"]  # half the folds start
    assert "post-processing" not in capsys.readouterr().out  # not recorded: no second table
    for fold in (1, 2):  # the post-processing rules recorded on one fold: not pooled; on both: a table
        path = tmp_path / f"fold-{fold}" / "qat" / "w8" / "test_metrics.json"
        metrics = json.loads(path.read_text())
        shifted = lambda step: {n: d + step for n, d in metrics["per_image"].items()}  # noqa: E731
        metrics["postprocessing"] = {name: {"validation_dice": 0.5 + step, "per_image": shifted(step)} for name, step
                                     in (("deployed", 0.0), ("float morphology", 0.01), ("float rule", -0.02))}
        path.write_text(json.dumps(metrics))
        assert pool.main([str(tmp_path), "--qat", "w8"]) == 0
        out = capsys.readouterr().out
        if fold == 1:
            assert "post-processing rules recorded on fold-1 only: not pooled" in out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert rows["deployed"].startswith("| deployed | 0.5000 | 0.6200 | -0.0300 [") and rows["deployed"].endswith("|  |")
    assert rows["float rule"].startswith("| float rule | 0.4800 | 0.6000 | -0.0500 [")
    assert "| 0.5100 | 0.6300 | -0.0200 [" in rows["float morphology"] and rows["float morphology"].endswith(
        "| +0.0100 [+0.010, +0.010] |")
    assert rows["float rule"].endswith("| -0.0200 [-0.020, -0.020] |")
    assert pool.main([str(tmp_path), "--qat", "other"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no fold-*/qat/other/test_metrics.json" in err[0]

    # a learned run keeps no start: deployed against float alone, with its bits; mixed with a start it is refused
    for fold in (1, 2):
        floats = json.loads((tmp_path / f"fold-{fold}" / "test_metrics.json").read_text())["per_image"]
        learned = tmp_path / f"fold-{fold}" / "qat" / "learned"
        learned.mkdir()
        (learned / "test_metrics.json").write_text(json.dumps({
            "per_image": {n: d + 0.02 for n, d in floats.items()}, "mean_weight_bits": 3.9 + fold / 100,
            "mean_activation_bits": 7.3}))
    assert pool.main([str(tmp_path), "--qat", "learned"]) == 0
    out = capsys.readouterr().out
    assert "| deployed | 0.6700 | +0.0200 [+0.020, +0.020] |  |" in out and "| start |" not in out
    assert "| pair, deployed models |" not in out  # no --versus, no pair table
    assert "fold-1 3.91 / 7.30, fold-2 3.92 / 7.30" in out
    # against another run on the same folds: learned (float + 0.02) minus w8 (fold 1 start: float - 0.01, fold 2
    # trained: float - 0.05), paired frame by frame
    assert pool.main([str(tmp_path), "--qat", "learned", "--versus", "w8"]) == 0
    assert "| learned - w8 | fold-1, fold-2 (8 frames) | 0.6700 / 0.6200 | +0.0500 [" in capsys.readouterr().out
    assert pool.main([str(tmp_path), "--qat", "learned", "--versus", "other"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no fold has both qat/learned and qat/other" in err[0]
    renamed = tmp_path / "fold-1" / "qat" / "renamed"
    renamed.mkdir()
    (renamed / "test_metrics.json").write_text(json.dumps({"per_image": {"elsewhere": 0.5}}))
    assert pool.main([str(tmp_path), "--qat", "learned", "--versus", "renamed"]) == 2
    assert "fold-1: qat/learned and qat/renamed were scored on different test frames" in capsys.readouterr().err
    # another set of fold models on the same frames (fold 1 only): its float run and its runs, with @other
    other = tmp_path / "other-set"
    other_qat = other / "fold-1" / "qat" / "w8"
    other_qat.mkdir(parents=True)
    floats = json.loads((tmp_path / "fold-1" / "test_metrics.json").read_text())["per_image"]
    for folder, step in ((other / "fold-1", -0.1), (other_qat, -0.2)):
        (folder / "test_metrics.json").write_text(json.dumps({"per_image": {n: d + step for n, d in floats.items()}}))
    assert pool.main([str(tmp_path), "--qat", "learned", "--other-set", str(other), "--versus", "float@other",
                      "w8@other", "w8"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| float - ")
            or line.startswith("| learned - ")]
    assert rows[0].startswith("| float - float@other | fold-1 (4 frames) | 0.6500 / 0.5500 | +0.1000 [")
    assert rows[1].startswith("| learned - float@other | fold-1 (4 frames) | 0.6700 / 0.5500 | +0.1200 [")
    assert rows[2].startswith("| learned - w8@other | fold-1 (4 frames) | 0.6700 / 0.4500 | +0.2200 [")
    assert rows[3].startswith("| learned - w8 | fold-1, fold-2 (8 frames) |")  # this set's run: both folds
    assert pool.main([str(tmp_path), "--qat", "learned", "--versus", "w8@other"]) == 2
    assert "--versus w8@other: a run of another set needs --other-set" in capsys.readouterr().err
    assert pool.main([str(tmp_path), "--qat", "learned", "--other-set", str(other), "--versus", "w4@other"]) == 2
    assert f"no fold has both qat/learned and qat/w4 of {other}" in capsys.readouterr().err
    (tmp_path / "fold-2" / "qat" / "learned" / "test_metrics.json").write_text(
        (tmp_path / "fold-2" / "qat" / "w8" / "test_metrics.json").read_text())
    assert pool.main([str(tmp_path), "--qat", "learned"]) == 2
    assert "kept a start on fold-2 only" in capsys.readouterr().err


def test_vanished_frames_counts_the_loss_from_nerves_the_run_lost(tmp_path, capsys):
    from conftest import load_script

    vanished = load_script("vanished_frames")
    plain = {"open_radius": 0, "close_radius": 0, "min_area": 0, "fill_holes": False}
    floats = {"a": 0.8, "b": 0.5, "c": 0.2, "d": 0.6}
    run = {"a": 0.0, "b": 0.4, "c": 0.0, "d": 0.7}  # a vanishes; c is empty too, but float scored only 0.2 there
    for fold, morphology in ((1, plain), (2, {**plain, "min_area": 100})):
        (tmp_path / f"fold-{fold}" / "qat" / "w4").mkdir(parents=True)
        (tmp_path / f"fold-{fold}" / "test_metrics.json").write_text(json.dumps({"per_image": floats,
                                                                                  "morphology": plain}))
        # under float's morphology the run keeps frame a's nerve (0.6) on both folds
        record = {"float morphology": {"per_image": {**run, "a": 0.6}, "morphology": plain}}
        (tmp_path / f"fold-{fold}" / "qat" / "w4" / "test_metrics.json").write_text(json.dumps(
            {"per_image": run, "morphology": morphology, "postprocessing": record}))
    folds = [str(tmp_path / "fold-1"), str(tmp_path / "fold-2")]
    assert vanished.main([*folds, "--qat", "w4"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row == "| w4 | deployed | 2 | 8 | -0.2500 | -0.2000 | 1 / 2 |"  # (-0.8 - 0.1 - 0.2 + 0.1) / 4; -0.8 / 4
    assert vanished.main([*folds, "--qat", "w4", "--rules", "deployed", "float morphology"]) == 0
    rows = capsys.readouterr().out.splitlines()[-2:]
    assert rows[1] == "| w4 | float morphology | 2 | 8 | -0.1000 | +0.0000 | 2 / 2 |"  # (-0.2 - 0.1 - 0.2 + 0.1) / 4
    assert vanished.main([*folds, "--qat", "w4", "--rules", "float rule"]) == 2
    assert "no post-processing record of the rule 'float rule'" in capsys.readouterr().err
    assert vanished.main([*folds, "--qat", "other"]) == 2
    assert "no other/test_metrics.json" in capsys.readouterr().err
