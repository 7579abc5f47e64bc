import pytest

from device_runtime.core.errors import InputError
from training.config import build_config, config_from_dict, load_toml, to_toml


@pytest.mark.parametrize("recipe, arch, size", [("paper", "resnet50", (256, 256)),
                                                ("edge", "mobilenet_v3_large", (256, 256)),
                                                ("quick", "mobilenet_v3_large", (128, 128))])
def test_recipes(recipe, arch, size):
    cfg = build_config(recipe)
    assert (cfg.arch, cfg.input_size) == (arch, size)
    if recipe != "quick":  # the paper's Table 1
        assert (cfg.lr, cfg.batch_size, cfg.epochs) == (1e-3, 16, 20)


def test_command_line_overrides_recipe_and_none_keeps_it():
    cfg = build_config("paper", epochs=3, lr=None)
    assert cfg.epochs == 3 and cfg.lr == 1e-3


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = build_config("edge", mask_label=None, input_size=(64, 96))
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert config_from_dict(load_toml(path), str(path)) == cfg


@pytest.mark.parametrize("changes, message", [({"arch": "vgg"}, "arch"), ({"input_size": (30, 64)}, "input_size"),
                                              ({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"),
                                              ({"split": (0.8, 0.2, 0.0)}, "split must be three positive shares"),
                                              ({"split": (0.5, 0.1, 0.1)}, "split must be three positive shares"),
                                              ({"split": ("a", 0.1, 0.1)}, "split must be three positive shares")])
def test_bad_values_are_named(changes, message):
    with pytest.raises(InputError, match=message):
        build_config("quick", **changes)


def test_unknown_recipe_and_unknown_keys(tmp_path):
    with pytest.raises(InputError, match="unknown recipe"):
        build_config("fast")
    bad = tmp_path / "mine.toml"
    bad.write_text("arch = 'resnet50'\nlearning_rate = 0.1\n")
    with pytest.raises(InputError, match="learning_rate"):
        build_config(str(bad))


def test_the_quick_phantom_validates_on_ten_subjects_tests_on_31_and_trains_on_190_frames(tmp_path):
    """quick's 600 phantom frames: 190 / 100 / 310 by subject (10 validation subjects, not 3; 31 test subjects, not
    10), training the same size as before; the phantom stage of a `small` run keeps the default shares; --split
    reaches the config."""
    from training.flags import config_from_args, get_args_parser
    from training.pretrain import phantom_config
    from training.train import prepare_split

    cfg = build_config("quick", run_dir=str(tmp_path / "run"))
    splits = prepare_split(cfg, tmp_path / "run", resume=False)
    assert [len(splits[side]) for side in ("train", "val", "test")] == [190, 100, 310]
    assert [len({s.subject for s in splits[side]}) for side in ("train", "val", "test")] == [19, 10, 31]
    assert phantom_config(build_config("small", split=(0.6, 0.1, 0.3), run_dir="r")).split == (0.8, 0.1, 0.1)
    args = get_args_parser().parse_args(["--recipe", "quick", "--split", "0.7", "0.1", "0.2"])
    assert config_from_args(args).split == (0.7, 0.1, 0.2)
