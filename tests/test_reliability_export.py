"""Issue 12, export: `--out` never destroys what the user owns; bundles are replaced only on request, whole."""

import json
import os

import pytest

from device_runtime.core.errors import InputError
from device_runtime.core.manifest import load_manifest
from export.bundle.writer import export_bundle
from export.cli import main as nerveseg


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A copy of the shared tiny run, so that these tests may export into it freely."""
    import shutil

    copy = tmp_path_factory.mktemp("export-guard") / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("bundle"))
    split = json.loads((copy / "split.json").read_text())
    split["root"] = str(copy / "synthetic")  # the copy's own phantom is its dataset
    (copy / "split.json").write_text(json.dumps(split))
    return copy


def _out_cases(run, tmp):
    notes = tmp / "notes"
    notes.mkdir(exist_ok=True)
    (notes / "patient-notes.txt").write_text("irreplaceable")
    a_file = tmp / "report.pdf"
    a_file.write_bytes(b"%PDF")
    return {
        "the run folder": (run, "is the run folder"),
        "the folder above the run": (run.parent, "holds the run folder"),
        "the checkpoints folder": (run / "checkpoints", "holds the checkpoint"),
        "the dataset": (run / "synthetic", "is the dataset"),
        "a folder of notes": (notes, "not a nerveseg bundle"),
        "a file": (a_file, "not a folder"),
    }


@pytest.mark.parametrize("case", ["the run folder", "the folder above the run", "the checkpoints folder",
                                  "the dataset", "a folder of notes", "a file"])
def test_out_that_would_destroy_something_is_refused_and_nothing_changes(case, run, tmp_path, capsys):
    out, reason = _out_cases(run, tmp_path)[case]
    watched = out if out.is_dir() else out.parent
    before = _snapshot(watched)
    code = nerveseg(["export", "--run-dir", str(run), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and reason in err[0] and str(out) in err[0]
    assert _snapshot(watched) == before


def test_out_dot_in_a_working_folder_is_refused(run, tmp_path, monkeypatch, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    assert nerveseg(["export", "--run-dir", str(run), "--out", ".", "--device", "cpu"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_a_bundle_is_written_new_replaced_only_with_replace_and_never_with_foreign_files(run, tmp_path, capsys):
    out = tmp_path / "b"
    assert nerveseg(["export", "--run-dir", str(run), "--out", str(out), "--device", "cpu"]) == 0
    first = _snapshot(out)
    load_manifest(out)
    capsys.readouterr()
    assert nerveseg(["export", "--run-dir", str(run), "--out", str(out), "--device", "cpu"]) == 2
    assert "--replace" in capsys.readouterr().err and _snapshot(out) == first
    (out / "model.jetson.fp16.trt10.0123456789abcdef.engine").write_bytes(b"cached engine")  # a device cache is fine
    assert nerveseg(["export", "--run-dir", str(run), "--out", str(out), "--device", "cpu", "--replace"]) == 0
    assert "replacing the bundle" in capsys.readouterr().out
    load_manifest(out)
    (out / "my-notes.txt").write_text("keep")
    assert nerveseg(["export", "--run-dir", str(run), "--out", str(out), "--device", "cpu", "--replace"]) == 2
    assert "my-notes.txt" in capsys.readouterr().err and (out / "my-notes.txt").read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_the_bundle_holds_no_path_of_the_machine(run, tmp_path):
    out, _ = export_bundle(run / "checkpoints" / "best.pt", tmp_path / "portable", device="cpu")
    roots = {str(run), str(run.parent), str(tmp_path), os.path.expanduser("~")} - {"/", ""}
    for path in out.iterdir():
        data = path.read_bytes()
        for root in roots:
            assert root.encode() not in data, f"{path.name} holds {root}"
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["dataset"]["split_sha256"]) == 64
    assert manifest["dataset"]["source"] == "synthetic phantom (nerveseg synth)"


def test_a_swap_killed_half_way_by_the_old_two_rename_scheme_is_repaired(tmp_path):
    from device_runtime.core.fileio import atomic_dir

    (tmp_path / ".bundle.old").mkdir()  # the old code was killed after parking the bundle, before the swap
    (tmp_path / ".bundle.old" / "manifest.json").write_text("{}")
    with pytest.raises(InputError):  # the next writer restores it first, then refuses to overwrite it
        with atomic_dir(tmp_path / "bundle"):
            pass
    assert (tmp_path / "bundle" / "manifest.json").read_text() == "{}"
