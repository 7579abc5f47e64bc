"""Issue 12, desktop: non-finite data and losses, labels, trusted checkpoint loading, strict JSON, OS errors."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import tifffile
import torch

from device_runtime.core.errors import InputError
from device_runtime.core.fileio import write_json
from export.cli import main as nerveseg
from training import train
from training.checkpoint import make_checkpoint, read_checkpoint, save_checkpoint
from training.data.dataset import discover, load_pairs, read_mask
from training.finite import NonFiniteError
from training.model import build_model


def strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _paired(tmp_path, n=4, image=None, mask=None):
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    for i in range(n):
        frame = np.full((32, 32), 100, np.uint8)
        label = np.zeros((32, 32), np.uint8)
        label[8:16, 8:16] = 1
        tifffile.imwrite(tmp_path / "images" / f"{i}.tif", image(i) if image else frame)
        if mask:
            mask(i, tmp_path / "masks")
        else:
            cv2.imwrite(str(tmp_path / "masks" / f"{i}.png"), label)
    return tmp_path


# ------------------------------------------------------------------------------------------------ non-finite


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["image", "mask"])
def test_a_non_finite_pixel_is_refused_naming_the_file(value, where, tmp_path):
    def image(i):
        frame = np.full((32, 32), 0.4, np.float32)
        if where == "image" and i == 2:
            frame[5, 5] = value
        return frame

    def mask(i, folder):
        label = np.zeros((32, 32), np.float32)
        label[8:16, 8:16] = 1
        if where == "mask" and i == 2:
            label[5, 5] = value
        tifffile.imwrite(folder / f"{i}.tif", label)

    root = _paired(tmp_path, image=image, mask=mask)
    with pytest.raises(NonFiniteError, match=rf"{where}s/2\.tif: {where} holds 1 NaN or Inf"):
        load_pairs(discover(root), (32, 32))


def test_a_non_finite_loss_stops_training_and_keeps_the_last_finite_checkpoint(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config.replace(run_dir=str(tmp_path / "run"))
    real_loss, real_epoch = train.BCEDiceLoss.forward, train.train_one_epoch
    poisoned = {"on": False}

    def loss(self, logits, target):
        value = real_loss(self, logits, target)
        return value * float("nan") if poisoned["on"] else value

    def epoch(*args, **kwargs):
        poisoned["on"] = kwargs["epoch"] == 1  # the second epoch diverges
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train.BCEDiceLoss, "forward", loss)
    monkeypatch.setattr(train, "train_one_epoch", epoch)
    with pytest.raises(NonFiniteError, match="epoch 2, batch 1"):
        train.main(cfg)
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())


def test_a_non_finite_checkpoint_is_never_written(tiny_config, tmp_path):
    model = build_model("mobilenet_v3_large")
    path = tmp_path / "last.pt"
    save_checkpoint(make_checkpoint(tiny_config, model), path)
    before = path.read_bytes()
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteError, match="previous file is kept"):
        save_checkpoint(make_checkpoint(tiny_config, model), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_old(tiny_config, tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(make_checkpoint(tiny_config, build_model("mobilenet_v3_large")), path)
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1216 vs 1110")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(InputError, match="cannot write the checkpoint .*no space left"):
        save_checkpoint(make_checkpoint(tiny_config, build_model("mobilenet_v3_large")), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ------------------------------------------------------------------------------------------------ labels


def test_mask_label_zero_is_refused_with_the_reason(capsys):
    code = nerveseg(["train", "--mask-label", "0", "--run-dir", "/nonexistent/never-made"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "background" in err[0]


def test_a_colour_mask_is_refused_a_grey_one_saved_as_rgb_is_read(tmp_path):
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[2:4, 2:4] = (0, 255, 0)  # a green nerve: luminance would make it 150, not a label
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    with pytest.raises(InputError, match=r"colour.png: colour mask \(pixel \(2, 2\) is RGB \(0, 255, 0\)\)"):
        read_mask(tmp_path / "colour.png")
    grey_rgb = np.zeros((8, 8, 3), np.uint8)
    grey_rgb[2:4, 2:4] = 1
    cv2.imwrite(str(tmp_path / "grey.png"), grey_rgb)
    assert read_mask(tmp_path / "grey.png")[2, 2] == 1 and read_mask(tmp_path / "grey.png").ndim == 2


def test_palette_masks_still_give_their_indices(tmp_path):
    from PIL import Image

    labels = np.zeros((8, 8), np.uint8)
    labels[1:3, 1:3], labels[5:7, 5:7] = 1, 2
    image = Image.fromarray(labels, mode="P")
    image.putpalette([0, 0, 0, 0, 255, 0, 255, 0, 0] + [0] * (256 * 3 - 9))
    image.save(tmp_path / "p.png")
    assert read_mask(tmp_path / "p.png").tolist() == labels.tolist()


# ------------------------------------------------------------------------------------------------ trust


def _old_format_checkpoint(cfg, path):
    """A checkpoint as the code before issue 12 wrote it: numpy's RNG state as a pickled ndarray."""
    import random

    checkpoint = make_checkpoint(cfg, build_model("mobilenet_v3_large"), epoch=1, best_val_dice=0.5,
                                 rng={"python": random.getstate(), "numpy": np.random.get_state(),
                                      "torch": torch.get_rng_state()})
    torch.save(checkpoint, path)


def test_old_and_new_checkpoints_load_with_weights_only(tiny_config, tiny_run, tmp_path):
    old = tmp_path / "old.pt"
    _old_format_checkpoint(tiny_config, old)
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(old)) >= {"numpy.ndarray", "numpy.dtype"}
    state = read_checkpoint(old)["rng"]["numpy"]
    np.random.set_state(state)  # the old tuple form still sets the generator
    from training.checkpoint import rng_state, set_rng_state

    # a last.pt as a run writes it between epochs (the finished one of tiny_run keeps no RNG state)
    new = tmp_path / "new.pt"
    save_checkpoint(make_checkpoint(tiny_config, build_model("mobilenet_v3_large"), epoch=1, best_val_dice=0.5,
                                    rng=rng_state()), new)
    for path in (new, tiny_run / "checkpoints" / "last.pt", tiny_run / "checkpoints" / "best.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], path  # plain: no allowlist needed
    set_rng_state(read_checkpoint(new)["rng"])


def test_the_float_run_being_trained_still_loads(tmp_path):
    """The lead's real run (if present on this machine) was written by the old code; it must stay readable."""
    from conftest import REPO

    path = REPO.parent.parent / "runs" / "edge-real" / "checkpoints" / "last.pt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    copy = tmp_path / "last.pt"
    shutil.copyfile(path, copy)  # never read a file that another process may replace mid-read
    assert read_checkpoint(copy)["arch"] == "mobilenet_v3_large"


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def _refused_in_one_line(load, path, capsys) -> str:
    with pytest.raises(InputError) as refused:
        load(path)
    message = str(refused.value)
    assert "this ran" not in capsys.readouterr().out
    assert "\n" not in message and message.startswith(f"{path}: refused")
    assert "could run code" in message and "(print)" in message  # what the pickle names
    assert "weights_only=False" not in message  # torch's advice, exactly wrong for this file
    return message


def _load_pretrained(path):
    return build_model("mobilenet_v3_large", pretrained=str(path))


def _load_qat(path):
    from qat.checkpoint import read_qat_checkpoint

    return read_qat_checkpoint(path)


@pytest.mark.parametrize("load", [read_checkpoint, _load_qat, _load_pretrained],
                         ids=["checkpoint", "qat-checkpoint", "pretrained-weights"])
def test_a_file_that_would_run_code_is_refused_in_one_line_at_every_entry(load, tmp_path, capsys):
    """Every torch.load of the project goes through training.trust.safe_load (export reads through the first two)."""
    path = tmp_path / "evil.pt"
    torch.save({"format": "nerveseg-checkpoint-1", "payload": _RunsCode()}, path)
    _refused_in_one_line(load, path, capsys)


def test_a_checkpoint_cut_short_is_one_line(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"format": "nerveseg-checkpoint-1", "x": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(InputError, match="cannot read checkpoint") as refused:
        read_checkpoint(path)
    assert "\n" not in str(refused.value) and "could run code" not in str(refused.value)


def test_export_of_a_checkpoint_that_would_run_code_says_one_line(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "nerveseg-checkpoint-1", "payload": _RunsCode()}, path)
    assert nerveseg(["export", "--checkpoint", str(path), "--out", str(tmp_path / "b"), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "this ran" not in captured.out and len(lines) == 1 and "could run code" in lines[0], captured.err
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------ strict JSON


def test_write_json_turns_nan_and_inf_into_null(tmp_path):
    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), np.float32("nan"), 1.5], "c": np.int64(3)})
    assert strict_loads((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, None, 1.5], "c": 3}


def test_every_json_of_a_run_and_its_bundle_is_strict(tiny_run):
    from export.bundle.writer import export_bundle

    bundle, _ = export_bundle(tiny_run / "checkpoints" / "best.pt", tiny_run.parent / "strict-bundle", device="cpu")
    files = list(tiny_run.rglob("*.json")) + list(bundle.rglob("*.json"))
    assert len(files) >= 5
    for path in files:
        strict_loads(path.read_text())
    for line in (tiny_run / "metrics.jsonl").read_text().splitlines():
        strict_loads(line)


# ------------------------------------------------------------------------------------------------ resume


def test_resume_drops_a_torn_log_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3, "train_lo')
    train.rewrite_log(log, 2)
    assert log.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_again(tiny_config, tmp_path):
    run_dir = tmp_path / "early"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("")
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1, "torn')
    assert train.check_run_dir(run_dir, resume=True) is False


@pytest.mark.parametrize("command", ["train", "synth"])
def test_an_output_folder_under_a_file_is_one_line(command, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    flag = "--run-dir" if command == "train" else "--out"
    code = nerveseg([command, flag, str(blocker / "sub"), *(["--epochs", "1"] if command == "train" else [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and str(blocker) in err[0], err


def test_the_rng_forms_older_qat_checkpoints_wrote_still_restore(tmp_path):
    """QAT last.pt files before the two rng_state copies were merged: numpy's state as a list with a list of
    keys, and the Python state's vector as a list once through torch.save / weights_only load."""
    import random

    from training.checkpoint import set_rng_state

    random.seed(3)
    np.random.seed(4)
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    path = tmp_path / "old_qat_rng.pt"
    torch.save({"python": [version, list(internal), gauss], "torch": torch.get_rng_state(),
                "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}, path)
    expected = random.random(), np.random.rand(), torch.rand(1)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
