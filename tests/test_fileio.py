import stat

import pytest

from device_runtime.core.errors import InputError
from device_runtime.core.fileio import atomic_dir


def test_a_new_folder_appears_whole_and_readable(tmp_path):
    with atomic_dir(tmp_path / "data") as tmp:
        assert not (tmp_path / "data").exists()  # nothing under the real name while writing
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "data" / "a.txt").read_text() == "a"
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_without_replace_a_filled_folder_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("old")
    with pytest.raises(InputError, match="not empty"):
        with atomic_dir(tmp_path / "data"):
            pass
    assert (tmp_path / "data" / "keep.txt").read_text() == "old"


def test_replace_swaps_the_old_folder_out_on_success_only(tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "bundle", replace=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("export failed")
    assert [p.name for p in (tmp_path / "bundle").iterdir()] == ["old.txt"]
    with atomic_dir(tmp_path / "bundle", replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "bundle").iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging or .old folder left behind


def test_temporaries_of_dead_writers_are_removed_by_the_next_write_live_ones_kept(tmp_path):
    import subprocess

    from device_runtime.core.fileio import write_text

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".last.pt.{dead.pid}.k3j2h1g0.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / f".bundle.{dead.pid}.a1b2c3d4.tmp").mkdir()
    live = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / f".last.pt.{live.pid}.zzzzzzzz.tmp").write_bytes(b"being written")
        write_text(tmp_path / "last.pt", "new")
        with atomic_dir(tmp_path / "bundle"):
            pass
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["last.pt", "bundle", f".last.pt.{live.pid}.zzzzzzzz.tmp"])
    finally:
        live.kill()
        live.wait()


def test_replace_exchanges_the_folders_in_one_step(tmp_path, monkeypatch):
    """The bundle path never disappears: no rename of the old folder away is ever seen."""
    import device_runtime.core.fileio as fileio

    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "a").write_text("old")
    renamed = []
    monkeypatch.setattr(fileio.Path, "rename", lambda self, target: renamed.append((self, target)))
    with atomic_dir(tmp_path / "bundle", replace=True) as tmp:
        (tmp / "a").write_text("new")
    assert renamed == [] and (tmp_path / "bundle" / "a").read_text() == "new"
