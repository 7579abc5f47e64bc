"""Both command lines as a newcomer meets them: --version, help on every option with its default, one-line
errors, and exit codes that say whether every requested artifact was written."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

import device_runtime
from device_runtime.core.errors import EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_OK

from conftest import REPO

TOOLS = {"nerveseg": "export.cli", "nerveseg-device": "device_runtime"}


def _parsers():
    from device_runtime.cli import get_args_parser as device_parser
    from export.cli import get_args_parser as desktop_parser

    for tool, parser in (("nerveseg", desktop_parser()), ("nerveseg-device", device_parser())):
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for name, sub in commands.choices.items():
            yield tool, name, sub


@pytest.mark.parametrize("tool", TOOLS)
def test_version(tool):
    result = subprocess.run([sys.executable, "-m", TOOLS[tool], "--version"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"{tool} {device_runtime.__version__}"


def test_every_option_of_every_subcommand_explains_itself_and_shows_its_default():
    for tool, name, parser in _parsers():
        text = parser.format_help()
        assert "exit status:" in text and f"  {EXIT_BAD_INPUT}    bad input" in text, (tool, name)
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            where = f"{tool} {name} {action.option_strings[0]}"
            assert action.help, f"{where} has no help text"
            if action.default not in (None, False) and not isinstance(action, argparse._HelpAction):
                shown = parser._get_formatter()._get_help_string(action)
                assert "default" in shown, f"{where}: its default {action.default!r} is not shown"


def test_both_tools_list_their_subcommands_alike_and_document_exit_codes():
    for tool, module in TOOLS.items():
        text = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=120).stdout
        assert "commands (COMMAND --help for each):" in text and "exit status:" in text, tool
    desktop = subprocess.run([sys.executable, "-m", "export.cli", "--help"], cwd=REPO, capture_output=True,
                             text=True, timeout=120).stdout
    assert f"  {EXIT_INCOMPLETE}    the command ran, but an artifact it asked for was refused" in desktop


def test_help_needs_no_torch():
    code = "import sys; from export.cli import get_args_parser; get_args_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_pipeline_help_names_every_stage_it_runs():
    from export.cli import get_args_parser

    text = next(sub for tool, name, sub in _parsers() if (tool, name) == ("nerveseg", "pipeline")).format_help()
    for stage in ("train", "tune", "evaluate", "FP32 bundle", "QAT with learned weight bits", "INT8 bundle",
                  "W8A8 and W4A8", "post-training quantization", "report.html", "exit status is 3"):
        assert stage in text, stage
    assert get_args_parser  # the parser the test walked is the tool's


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--run-dir", "r", "--grid", "arm"], "invalid choice: 'arm'"),
    (["qat", "--run-dir", "r", "--grid", "arm"], "invalid choice: 'arm'"),
    (["train", "--epochs", "two"], "invalid int value: 'two'"),
])
def test_flag_errors_are_one_line_with_exit_2(argv, message):
    result = subprocess.run([sys.executable, "-m", "export.cli", *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == EXIT_BAD_INPUT and result.stderr.count("\n") == 1
    assert message in result.stderr and "--help" in result.stderr


def test_the_grids_offered_are_the_quantizers_grids():
    from export import cli
    from qat import config

    assert tuple(cli.GRIDS) == tuple(config.GRIDS)
    assert tuple(cli.ACTIVATION_RANGES) == tuple(config.ACTIVATION_RANGES)
    assert tuple(cli.ACTIVATION_INITS) == tuple(config.ACTIVATION_INITS)
    assert tuple(cli.ALLOCATIONS) == tuple(config.ALLOCATIONS)
    assert tuple(cli.SCHEDULE_SIDES) == tuple(config.SCHEDULE_SIDES)


# ------------------------------------------------------------------------------------------------ exit codes


def _finished_qat(run_dir, name, exported: bool) -> None:
    folder = run_dir / "qat" / name
    (folder / "bundle").mkdir(parents=True)
    (folder / "test_metrics.json").write_text("{}")
    if exported:
        (folder / "bundle" / "manifest.json").write_text("{}")


def test_a_pipeline_whose_int8_export_was_refused_exits_3_and_says_which_last(tmp_path, monkeypatch, capsys):
    import export.workflows.pipeline
    from export.cli import main

    run_dir = tmp_path / "run"
    _finished_qat(run_dir, "learned-a8-i4-t4", exported=True)
    _finished_qat(run_dir, "w8a8", exported=False)
    _finished_qat(run_dir, "w4a8", exported=True)
    (run_dir / "sweep.json").write_text(json.dumps({"runs": {"w8a8": {"export_error": "not exported: parity 0.98"}}}))
    monkeypatch.setattr(export.workflows.pipeline, "run_pipeline", lambda cfg, resume, qat_epochs: run_dir / "bundle")
    assert main(["pipeline", "--run-dir", str(run_dir), "--device", "cpu"]) == EXIT_INCOMPLETE
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("nerveseg pipeline: incomplete: 1 of 3 INT8 exports refused (w8a8)")

    (run_dir / "qat" / "w8a8" / "bundle" / "manifest.json").write_text("{}")  # exported after all: complete
    assert main(["pipeline", "--run-dir", str(run_dir), "--device", "cpu"]) == EXIT_OK


def test_a_refused_int8_export_exits_3_not_2(tmp_path, monkeypatch, capsys):
    import export.bundle.int8
    from export.bundle.writer import ParityError
    from export.cli import main

    def refuse(*args, **kwargs):
        raise ParityError("model.int8.onnx: ONNX Runtime disagrees with the fake-quant model; no bundle written")

    monkeypatch.setattr(export.bundle.int8, "export_int8_bundle", refuse)
    assert main(["export", "--run-dir", str(tmp_path), "--qat", "w8a8"]) == EXIT_INCOMPLETE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nerveseg: refused: model.int8.onnx")


def test_bundle_pointed_at_a_run_folder_suggests_its_bundles(tmp_path, capsys):
    from device_runtime.cli import main

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    assert main(["info", "--bundle", str(run_dir)]) == EXIT_BAD_INPUT
    assert f"write one with 'nerveseg export --run-dir {run_dir}'" in capsys.readouterr().err
    for folder in (run_dir / "bundle", run_dir / "qat" / "w8a8" / "bundle"):
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text("{}")
    assert main(["run", "--bundle", str(run_dir), "--source", "synthetic"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"this is a run folder; its bundles: {run_dir / 'bundle'}, {run_dir / 'qat' / 'w8a8' / 'bundle'}" in err[0]


def test_info_prints_rounded_figures_in_their_units():
    from device_runtime.info import bundle_lines
    from device_runtime.core.manifest import Manifest
    from device_runtime.core.postprocess import Morphology

    layers = [{"name": f"conv{i}", "weight_bits": 4 if i else 3, "activation_bits": 8} for i in range(5)]
    manifest = Manifest(architecture="fake", input_size=(64, 64), threshold=0.5, morphology=Morphology(), files=[],
                        quantization={"scheme": "int8 QDQ", "mean_weight_bits": 3.954574252507102,
                                      "mean_activation_bits": 8.0, "layers": layers},
                        metrics={"parity": {"model.int8.onnx": {"mask_dice": 0.99871, "max_prob_diff": 3.2e-05,
                                                                "flipped_fraction": 0.00021, "frames": 10}},
                                 "latency_ms": {"ort-cpu": {"fp32": 13.24, "int8": 8.31, "threads": 2, "runs": 20,
                                                            "machine": "x86_64"}}})
    text = "\n".join(bundle_lines(manifest))
    assert "mean bits: weights 3.95, activations 8.00 over 5 layers" in text and "3.9545" not in text
    assert "layers by bits: W3 A8 x1, W4 A8 x4 (--layers: every layer)" in text and "conv1" not in text
    assert "mask Dice 0.9987, max |dp| < 0.001, pixels flipped 0.021 % (10 frames)" in text
    assert "latency at export on ort-cpu (2 threads, 20 runs, median): FP32 13.2 ms, INT8 8.3 ms" in text
    assert "threads 2" not in text.replace("(2 threads", "")
    assert "    conv1                                        W4 A8" in "\n".join(bundle_lines(manifest, layers=True))
