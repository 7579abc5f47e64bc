"""`pretrained = "phantom"`: the phantom stage trains once, the real run starts from its backbone, a finished
stage is reused, a stage of other settings is refused, and a resumed run does not need the stage any more."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from device_runtime.core.errors import InputError
from training import loop, pretrain, train
from training.checkpoint import read_checkpoint
from training.config import build_config, load_run_config, to_toml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def phantom_config(tmp_path):
    return build_config("quick", run_dir=str(tmp_path / "run"), input_size=(64, 64), epochs=1, batch_size=4,
                        synth_count=30, device="cpu", val_batch_size=8, pretrained="phantom", phantom_frames=40)


def test_the_stage_is_the_same_recipe_on_the_phantom(phantom_config, tmp_path):
    real = phantom_config.replace(data=str(tmp_path / "data"), mask_label=1, group_by="prefix")
    stage = pretrain.phantom_config(real)
    assert stage.run_dir == str(tmp_path / "run" / "phantom")
    assert (stage.data, stage.mask_label, stage.group_by, stage.synth_count, stage.pretrained) == ("", None, "auto", 40, "none")
    assert stage.split == (0.8, 0.1, 0.1) != real.split  # quick's own shares hold out a third of its frames
    assert stage.replace(data=real.data, mask_label=1, group_by="prefix", synth_count=30, pretrained="phantom",
                         run_dir=real.run_dir, split=real.split) == real  # nothing else differs
    # the backbone alone is taken: one stage serves both decoders; the whole network needs the stage's to match
    assert pretrain.phantom_config(real.replace(decoder="skip")) == stage
    assert pretrain.phantom_config(real.replace(decoder="skip", phantom_head=True)).decoder == "skip"
    shared = real.replace(phantom_dir=str(tmp_path / "shared"))
    assert pretrain.phantom_config(shared).run_dir == str(tmp_path / "shared")
    assert pretrain.backbone_path(shared) == tmp_path / "shared" / "checkpoints" / "best.pt"


def test_the_stage_can_train_at_its_own_input_size(phantom_config, tmp_path):
    # ablation (n): the stage trained at 256x256, the real frames seen at 320x320
    real = phantom_config.replace(input_size=(96, 96), phantom_input_size=(64, 64))
    stage = pretrain.phantom_config(real)
    assert (stage.input_size, stage.phantom_input_size) == ((64, 64), ())
    assert pretrain.phantom_config(real.replace(phantom_input_size=())).input_size == (96, 96)  # () = input_size
    (tmp_path / "config.toml").write_text(to_toml(real))
    assert load_run_config(tmp_path) == real and load_run_config(tmp_path).phantom_input_size == (64, 64)
    parser = train.get_args_parser()
    args = parser.parse_args(["--recipe", "small", "--input-size", "96", "96", "--phantom-input-size", "64", "64"])
    assert train.config_from_args(args).phantom_input_size == (64, 64)
    with pytest.raises(InputError, match=r"phantom_input_size must be two multiples of 8 of at least 32, got \[30, 30\]"):
        build_config("small", phantom_input_size=(30, 30))


def test_the_stage_can_train_with_its_own_batch_and_budget(phantom_config, tmp_path):
    # ablation (p): the real run takes batch 8 x 1200 steps, the stage keeps batch 16 x 600 on its phantom frames
    real = phantom_config.replace(batch_size=8, steps=1200, phantom_batch_size=16, phantom_steps=600)
    stage = pretrain.phantom_config(real)
    assert (stage.batch_size, stage.steps, stage.phantom_batch_size, stage.phantom_steps) == (16, 600, 0, 0)
    own = pretrain.phantom_config(real.replace(phantom_batch_size=0, phantom_steps=0))
    assert (own.batch_size, own.steps) == (8, 1200)  # 0 = the run's own
    (tmp_path / "config.toml").write_text(to_toml(real))
    assert load_run_config(tmp_path) == real
    args = train.get_args_parser().parse_args(["--recipe", "small", "--phantom-batch-size", "12", "--phantom-steps", "90"])
    cfg = train.config_from_args(args)
    assert (cfg.phantom_batch_size, cfg.phantom_steps) == (12, 90)
    for name in ("phantom_batch_size", "phantom_steps"):
        with pytest.raises(InputError, match=rf"{name} must be >= 0, got -1"):
            build_config("small", **{name: -1})


def test_the_small_recipe_pretrains_on_2880_phantom_frames():
    cfg = build_config("small")
    assert (cfg.pretrained, cfg.phantom_frames) == ("phantom", 2880)
    # ablation (p): the stage at 256x256, batch 16 x 600 steps; the real frames at 320x320, batch 8 x 1200 steps
    stage = pretrain.phantom_config(cfg)
    assert (stage.input_size, stage.batch_size, stage.steps) == ((256, 256), 16, 600)
    assert (cfg.input_size, cfg.batch_size, cfg.steps) == ((320, 320), 8, 1200)


def test_the_flags_reach_the_config(tmp_path):
    parser = train.get_args_parser()
    cfg = train.config_from_args(parser.parse_args(["--recipe", "small", "--run-dir", str(tmp_path / "r"),
                                                    "--phantom-frames", "120", "--phantom-dir", str(tmp_path / "p")]))
    assert (cfg.pretrained, cfg.phantom_frames, cfg.phantom_dir) == ("phantom", 120, str(tmp_path / "p"))
    cfg = train.config_from_args(parser.parse_args(["--recipe", "small", "--pretrained", "none"]))
    assert cfg.pretrained == "none"
    with pytest.raises(InputError, match="phantom_frames must be at least 1"):
        build_config("small", phantom_frames=0)
    cfg = train.config_from_args(parser.parse_args(["--recipe", "small", "--phantom-head"]))
    assert cfg.phantom_head and not build_config("small").phantom_head
    with pytest.raises(InputError, match="phantom_head .* needs pretrained = 'phantom', got 'none'"):
        train.config_from_args(parser.parse_args(["--recipe", "small", "--pretrained", "none", "--phantom-head"]))


def test_a_run_starts_from_the_phantom_backbone_and_reuses_a_finished_stage(phantom_config, tmp_path, monkeypatch,
                                                                            capsys):
    asked = []
    real_build = train.build_model_of
    monkeypatch.setattr(train, "build_model_of", lambda cfg, *, pretrained, **kw: asked.append(pretrained)
                        or real_build(cfg, pretrained=pretrained, **kw))
    # the run is continued past its end below: its last.pt keeps the resume state a finished run's would drop
    monkeypatch.setattr(loop, "finished_checkpoint", lambda checkpoint, keep_weights=True: checkpoint)
    run_dir = train.main(phantom_config)
    stage = run_dir / "phantom"
    assert asked == ["none", str(stage / "checkpoints" / "best.pt")]  # the stage from scratch, then the run from it
    assert json.loads((stage / "done.json").read_text())["best_val_dice"] == \
        read_checkpoint(stage / "checkpoints" / "best.pt")["best_val_dice"]
    split = json.loads((stage / "split.json").read_text())
    assert sum(len(split[side]) for side in ("train", "val", "test")) == 40  # phantom_frames, not synth_count

    # a second run naming the same stage trains nothing there
    stamps = {p.name: p.stat().st_mtime_ns for p in (stage / "checkpoints").iterdir()}
    asked.clear()
    capsys.readouterr()
    other = train.main(phantom_config.replace(run_dir=str(tmp_path / "other"), phantom_dir=str(stage)))
    assert asked == [str(stage / "checkpoints" / "best.pt")] and not (other / "phantom").exists()
    assert f"phantom stage reused: {stage} (finished" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (stage / "checkpoints").iterdir()} == stamps

    # a stage of other settings is refused before anything is trained
    with pytest.raises(InputError, match=r"phantom pre-training made with other settings \(phantom_frames, synth_count\)"):
        train.main(phantom_config.replace(run_dir=str(tmp_path / "third"), phantom_dir=str(stage), phantom_frames=50))
    assert not (tmp_path / "third").exists()
    # the network's activation too: a ReLU backbone does not start from a hardswish stage
    with pytest.raises(InputError, match=r"made with other settings \(relu_backbone\)"):
        train.main(phantom_config.replace(run_dir=str(tmp_path / "third"), phantom_dir=str(stage), relu_backbone=True))
    assert not (tmp_path / "third").exists()

    # a resumed run restores its own weights: the stage may be gone
    shutil.rmtree(stage)
    asked.clear()
    train.main(phantom_config.replace(epochs=2), resume=True)
    assert asked == ["none"] and not stage.exists()
    assert read_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 2

    # a run folder that is refused is refused at once, not after a phantom stage
    with pytest.raises(InputError, match="already holds a trained run"):
        train.main(phantom_config)
    assert not stage.exists()


def test_an_interrupted_stage_resumes_and_a_finished_one_without_its_model_is_refused(phantom_config):
    stage = pretrain.phantom_config(phantom_config)
    train.main(stage)
    assert not pretrain.check_stage(stage)  # trained, but not marked finished (killed before done.json)
    stamp = (pretrain.backbone_path(phantom_config)).stat().st_mtime_ns
    train.pretrain_on_phantom(phantom_config)  # resumes: nothing left to train, marks it finished
    assert pretrain.check_stage(stage)
    assert pretrain.backbone_path(phantom_config).stat().st_mtime_ns == stamp
    pretrain.backbone_path(phantom_config).unlink()
    with pytest.raises(InputError, match="no checkpoints/best.pt"):
        pretrain.check_stage(stage)


def test_the_backbone_really_is_loaded(phantom_config):
    stage = pretrain.phantom_config(phantom_config)
    train.main(stage)
    trainer = train.build_trainer(phantom_config, torch.device("cpu"),
                                  pretrained=str(pretrain.backbone_path(phantom_config)))
    saved = read_checkpoint(pretrain.backbone_path(phantom_config))["model"]
    own = trainer.model.state_dict()
    backbone = [k for k in saved if k.startswith("backbone.")]
    assert backbone and all(torch.equal(own[k], saved[k]) for k in backbone)
    head = [k for k in saved if k.startswith("classifier.") and k.endswith("weight")]
    assert not all(torch.equal(own[k], saved[k]) for k in head)  # the head starts from scratch

    with_head = phantom_config.replace(phantom_head=True)
    assert pretrain.phantom_config(with_head) == stage  # one stage serves runs with and without its head
    own = train.build_trainer(with_head, torch.device("cpu"),
                              pretrained=str(pretrain.backbone_path(phantom_config))).model.state_dict()
    assert all(torch.equal(own[k], saved[k]) for k in saved)  # --phantom-head: the whole network, head included
    with pytest.raises(InputError, match="is not a checkpoint of this network"):
        train.build_trainer(with_head.replace(arch="resnet50"), torch.device("cpu"),
                            pretrained=str(pretrain.backbone_path(phantom_config)))


def test_a_bundle_says_phantom_but_not_where_the_stage_was():
    from export.bundle.portable import portable_config

    out = portable_config({"run_dir": "/site/run", "data": "/site/data", "phantom_dir": "/site/run/phantom",
                           "pretrained": "phantom"})
    assert out["pretrained"] == "phantom" and "/site" not in json.dumps(out)
    assert portable_config({"phantom_dir": ""})["phantom_dir"] == ""


def test_a_second_process_cannot_train_into_a_run_folder_in_use(phantom_config, tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from training.train import exclusive_run\n"
                               "with exclusive_run(Path(sys.argv[1])):\n print('held', flush=True); time.sleep(60)",
                               str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = phantom_config.replace(run_dir=str(run_dir), pretrained="none")
        with pytest.raises(InputError, match="another process is training in this run folder"):
            train.main(cfg)
        assert not (run_dir / "config.toml").exists()  # refused before writing anything
        with pytest.raises(InputError, match="another process is training in this run folder"):
            train.pretrain_on_phantom(phantom_config.replace(phantom_dir=str(run_dir)))
    finally:
        holder.kill()
        holder.wait()
    train.main(phantom_config.replace(run_dir=str(run_dir), pretrained="none"))  # the kernel dropped the lock
    assert (run_dir / "checkpoints" / "last.pt").is_file()


def test_a_run_killed_in_its_phantom_stage_resumes_with_resume(phantom_config, monkeypatch, capsys):
    """`--resume` after a kill during the stage: the run's config.toml is written before the stage, so --resume
    finds the run, the stage continues from its own last checkpoint, and the run trains."""
    calls = []

    def killed(cfg, *args):
        calls.append(cfg.run_dir)
        raise KeyboardInterrupt  # as kill -9 during the stage: nothing after it runs

    monkeypatch.setattr(train, "pretrain_on_phantom", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(phantom_config)
    run_dir = Path(phantom_config.run_dir)
    assert load_run_config(run_dir) == phantom_config and not (run_dir / "checkpoints").exists()
    monkeypatch.undo()
    args = train.get_args_parser().parse_args(["--run-dir", str(run_dir), "--resume"])
    resumed = train.config_from_args(args)
    assert resumed == phantom_config
    train.main(resumed, resume=True)
    assert (run_dir / pretrain.phantom_config(resumed).run_dir / "checkpoints" / "best.pt").is_file()
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert "starting the run again" in capsys.readouterr().out
