"""ovjax.config: FILE.py:ARG, typed overrides, errors that list the valid keys, the frozen result; and the
run schema of ovjax/train/config.py (every field the loop reads is in configs/, none added at run time)."""

from __future__ import annotations

import ml_collections
import pytest

from ovjax import config


def test_overrides_cast_to_the_field_type():
    cfg = config.load("configs/stage1.py:tiny", ["--config.train.steps=7", "--config.optim.lr", "0.5",
                                                 "--config.checkpoint.async_save=false",
                                                 "--config.optim.trainable=merger,visual",
                                                 "--config.mesh.fsdp=2", "--config.data.train=/x"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 0.5
    assert cfg.checkpoint.async_save is False
    assert tuple(cfg.optim.trainable) == ("merger", "visual")
    assert cfg.mesh.fsdp == 2 and cfg.data.train == "/x"
    assert config.load("configs/stage2.py:tiny").data.synthetic == "qa"
    assert config.load("configs/stage1.py:8b").model.text.hidden_size == 4096


def test_override_typing_details():
    cfg = config.load("configs/stage1.py:tiny", [("optim.groups.visual", "2e-5"), ("optim.lr", "3"),
                                                 ("optim.trainable", "('merger', 'visual')"),
                                                 ("optim.frozen", ""), ("train.peak_flops", "1e12"),
                                                 ("checkpoint.keep", "5"), ("train.steps", 9)])
    assert cfg.optim.groups.visual == 2e-5 and isinstance(cfg.optim.groups.visual, float)  # a None field
    assert cfg.optim.lr == 3.0 and isinstance(cfg.optim.lr, float)
    assert tuple(cfg.optim.trainable) == ("merger", "visual") and tuple(cfg.optim.frozen) == ()
    assert cfg.train.peak_flops == 1e12 and cfg.checkpoint.keep == 5 and cfg.train.steps == 9


@pytest.mark.parametrize("override, message", [
    ("--config.train.stepz=3", "unknown key 'stepz'.*steps"),
    ("--config.trian.steps=3", "no section 'trian'"),
    ("--config.train.steps=three", "expected an int"),
    ("--config.checkpoint.async_save=maybe", "expected a bool"),
    ("--config.train=3", "is a section"),
])
def test_bad_overrides(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load("configs/stage1.py:tiny", [override])


def test_unknown_key_error_lists_the_valid_keys_on_one_line():
    with pytest.raises(config.ConfigError) as e:
        config.load("configs/stage1.py:tiny", ["--config.checkpoint.evry=3"])
    text = str(e.value)
    assert "\n" not in text
    assert "keys at checkpoint: ['async_save', 'every', 'keep']" in text
    with pytest.raises(config.ConfigError, match=r"no section 'trian' at the top level; keys there: \[.*'train'"):
        config.load("configs/stage1.py:tiny", ["--config.trian.steps=3"])


def test_the_loaded_config_is_frozen_and_with_values_copies():
    cfg = config.load("configs/stage1.py:tiny")
    assert isinstance(cfg, ml_collections.FrozenConfigDict)
    with pytest.raises(AttributeError):
        cfg.train.steps = 3
    with pytest.raises(AttributeError):
        cfg.new_section = ml_collections.ConfigDict()
    other = config.with_values(cfg, {"train.steps": 3, "data.train": "/p"})
    assert isinstance(other, ml_collections.FrozenConfigDict)
    assert (other.train.steps, other.data.train) == (3, "/p") and (cfg.train.steps, cfg.data.train) == (20, "")
    with pytest.raises(config.ConfigError, match="unknown key 'stepz'"):
        config.with_values(cfg, {"train.stepz": 3})


def test_file_and_arg(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("import ml_collections\n"
                 "def get_config(arg='a'):\n"
                 "    return ml_collections.ConfigDict(dict(arg=arg, n=1))\n")
    assert config.load(f"{f}:b").arg == "b"
    assert config.load(str(f)).arg == "a"  # no :ARG -> get_config()
    (tmp_path / "none.py").write_text("x = 1\n")
    with pytest.raises(config.ConfigError, match="has no get_config"):
        config.load(f"{tmp_path / 'none.py'}:a")
    (tmp_path / "bad.py").write_text("def get_config(arg):\n    return {'a': 1}\n")
    with pytest.raises(config.ConfigError, match="must return a ConfigDict"):
        config.load(f"{tmp_path / 'bad.py'}:a")
    with pytest.raises(config.ConfigError, match="not found"):
        config.load("configs/nothing.py:tiny")
    with pytest.raises(config.ConfigError, match="needs a value"):
        config.split_overrides(["--config.train.steps"])
    assert config.split_overrides(["--workdir", "w", "--config.a.b", "1", "--config.c=2"]) == (
        ["--workdir", "w"], [("a.b", "1"), ("c", "2")])


def test_every_field_the_loop_reads_is_in_the_schema():
    """The fields `run_defaults` used to add at run time are part of the config builders now."""
    for spec in ("configs/stage1.py:tiny", "configs/stage1_5.py:8b", "configs/stage2.py:4b", "configs/demo.py:stage2"):
        cfg = config.load(spec)
        for dotted in ("train.on_nonfinite", "train.peak_flops", "train.progress", "train.xla_compiler_options",
                       "train.max_segments", "checkpoint.every", "checkpoint.keep", "checkpoint.async_save",
                       "init.from_checkpoint", "init.from_hf", "data.seed", "data.train", "data.workers",
                       "data.min_pixels", "data.max_pixels", "data.synthetic", "data.synthetic_samples",
                       "data.synthetic_max_turns", "data.synthetic_root", "data.tokenizer"):
            section, key = dotted.split(".")
            assert key in cfg[section], (spec, dotted)


def test_run_config_validation():
    from ovjax.train.config import validate

    validate(config.load("configs/stage1.py:tiny"))
    for key, value, message in (("train.on_nonfinite", "ignore", "on_nonfinite"), ("train.steps", "0", "positive"),
                                ("train.micro_batches", "3", "not divisible"), ("train.progress", "x", "progress")):
        with pytest.raises(config.ConfigError, match=message):
            validate(config.load("configs/stage1.py:tiny", [(key, value)]))
    with pytest.raises(config.ConfigError, match="at most one"):
        validate(config.load("configs/stage1.py:tiny", [("init.from_hf", "/a"), ("init.from_checkpoint", "/b")]))
