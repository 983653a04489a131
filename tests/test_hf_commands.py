"""The export / import verbs end to end (issue 11, must-show 2): a checkpoint trained by `python -m ovjax train`,
exported, reloaded with `ovjax.hf.load`, gives the training params' logits; import of that export followed by
export gives identical tensors."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import ovjax.hf as hf
from ovjax import checkpoint
from ovjax.hf import export_cmd, import_cmd
from ovjax.hf.files import TensorSource

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "ovjax", "train", "--config", "configs/stage1.py:tiny",
                           "--workdir", str(workdir), "--config.train.steps=2", "--config.checkpoint.every=2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    assert export_cmd.main(["--checkpoint", str(trained), "--out", str(out)]) == 0
    return out


def inputs(cfg, rng):
    """Two rows of text and one image of a 4x4 patch grid in the first row (upstream layout)."""
    k = 4  # 16 patches / 4
    ids = rng.randint(10, 40, size=(2, 12))
    ids[0, 2] = cfg.vision_start_token_id
    ids[0, 3:3 + k] = cfg.image_token_id
    ids[0, 3 + k] = cfg.vision_end_token_id
    pixels = rng.randn(16, 3 * 14 * 14).astype(np.float32)
    return ids, pixels, np.array([[1, 4, 4]])


def test_export_reloads_to_the_training_logits(trained, exported):
    meta = checkpoint.read_meta(trained)
    cfg = ml_collections.ConfigDict(json.loads(meta["config"])).model
    params = checkpoint.load_params(trained)
    ids, pixels, grid = inputs(cfg, np.random.RandomState(0))
    want = np.asarray(hf.Model(cfg, jax.tree_util.tree_map(np.asarray, params)).logits(ids, pixels, grid))
    again = hf.load(exported, remote_code_quirks=False)
    got = np.asarray(again.logits(ids, pixels, grid))
    assert np.abs(got - want).max() <= 1e-5
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "generation_config.json", "preprocessor_config.json"):
        assert (exported / name).is_file(), name
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_llavaonevision1_5.LLaVAOneVision1_5_ForConditionalGeneration"
    assert not any("--" in v for v in config["auto_map"].values())  # no pointer to another repository's code
    assert config["text_config"]["vocab_size"] == params["language_model"]["embed_tokens"].shape[0]
    proc = json.loads((exported / "preprocessor_config.json").read_text())
    run = ml_collections.ConfigDict(json.loads(meta["config"]))
    assert proc["temporal_patch_size"] == 1
    assert proc["max_pixels"] == run.data.max_pixels and proc["min_pixels"] == run.data.min_pixels


def test_import_then_export_gives_identical_tensors(exported, tmp_path):
    work = tmp_path / "work"
    assert import_cmd.main(["--hf", str(exported), "--out", str(work), "--preset", "tiny"]) == 0
    again = tmp_path / "again"
    assert export_cmd.main(["--checkpoint", str(work), "--out", str(again)]) == 0
    with TensorSource(exported) as a, TensorSource(again) as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            x, y = a.get(key), b.get(key)
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), key
    for name in ("tokenizer.json", "preprocessor_config.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (exported / name).read_bytes(), name
    # what `train --config.init.from_checkpoint=WORK` reads: params alone and the model config
    meta = checkpoint.read_meta(work)
    assert json.loads(meta["config"])["model"]["name"] == "tiny"


def test_bf16_export_and_sharded_layout(trained, tmp_path):
    out = tmp_path / "bf16"
    assert export_cmd.main(["--checkpoint", str(trained), "--out", str(out), "--dtype", "bfloat16",
                            "--max-shard-gb", str(300_000 / 1024 ** 3)]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = hf.load(out, "bfloat16", remote_code_quirks=False)
    params = checkpoint.load_params(trained)
    embed = np.asarray(params["language_model"]["embed_tokens"])
    got = np.asarray(model.params["language_model"]["embed_tokens"]).astype(np.float32)
    assert np.abs(got - embed).max() <= np.abs(embed).max() * 2 ** -8


def test_bad_command_inputs_say_one_line(tmp_path, exported, capsys):
    assert export_cmd.main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("export: no checkpoints at") and "\n" not in err
    assert import_cmd.main(["--hf", str(tmp_path / "none"), "--out", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("import:") and "config.json" in err and "\n" not in err
