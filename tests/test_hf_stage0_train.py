"""`python -m ovjax assemble` starts a stage-1 run (issue 11, must-show 3): a tiny random MLCDVisionModel and
Qwen3ForCausalLM with the tiny preset's sizes (the LLM's vocabulary and tokenizer those of a synthetic packed
set) are assembled, then `python -m ovjax train --config configs/stage1.py:tiny --config.init.from_hf=HFDIR`
runs 3 steps: it imports HFDIR, the loss is finite, and only `merger/*` params move (stage 1 trains the
projector only)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import ovjax.hf as hf  # noqa: E402
from ovjax import checkpoint, config  # noqa: E402
from ovjax.configs.models import preset  # noqa: E402
from ovjax.data import synthetic  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
SPECIAL = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
           "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


def run(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one CPU device: cheap
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "ovjax", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def random_norms(model):
    """Norm scales away from 1 so a wrongly mapped norm shows (transformers initialises them to ones)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))


def test_assembled_stage0_starts_a_stage1_run(tmp_path):
    run_cfg = config.load("configs/stage1.py:tiny", [("data.synthetic_samples", "64")])
    spec = synthetic.spec_for_run(run_cfg, tmp_path / "data")
    packed, tok_dir = synthetic.make(spec, log=lambda *_: None)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    vocab = len(tok)
    ids = {field: tok.convert_tokens_to_ids(s) for field, s in SPECIAL.items()}

    tiny = preset("tiny")
    v, t = tiny.vision, tiny.text
    torch.manual_seed(0)
    mlcd = transformers.MLCDVisionModel(transformers.MLCDVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.depth,
        num_attention_heads=v.num_heads, patch_size=v.patch_size, num_channels=v.in_channels,
        layer_norm_eps=v.layer_norm_eps, image_size=56))
    random_norms(mlcd)
    mlcd.save_pretrained(tmp_path / "mlcd")
    qwen = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        head_dim=t.head_dim, rope_theta=t.rope_theta, rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False))
    random_norms(qwen)
    qwen.save_pretrained(tmp_path / "qwen3")
    for name in os.listdir(tok_dir):   # assemble takes its special-token ids from the LLM dir's tokenizer
        shutil.copy(tok_dir / name, tmp_path / "qwen3" / name)

    hf_dir, workdir = tmp_path / "stage0", tmp_path / "run"
    run(["assemble", "--vision", str(tmp_path / "mlcd"), "--llm", str(tmp_path / "qwen3"), "--out", str(hf_dir)],
        REPO)
    assembled = json.loads((hf_dir / "config.json").read_text())
    assert {k: assembled[k] for k in ids} == ids

    # The tiny preset's model with the data's vocabulary and special-token ids: nothing else may differ.
    overrides = [f"--config.model.text.vocab_size={vocab}"] + [f"--config.model.{k}={i}" for k, i in ids.items()]
    out = run(["train", "--config", "configs/stage1.py:tiny", "--workdir", str(workdir),
               f"--config.init.from_hf={hf_dir}", f"--config.data.train={packed}", f"--config.data.tokenizer={tok_dir}",
               f"--config.data.max_pixels={spec.max_pixels}", f"--config.train.steps={STEPS}",
               f"--config.checkpoint.every={STEPS}", "--config.train.log_every=1", "--config.train.progress=lines",
               *overrides], REPO)
    assert f"imported {hf_dir}" in out, out[-3000:]

    losses = [r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == STEPS and np.all(np.isfinite(losses)), losses

    trained = jax.tree_util.tree_flatten_with_path(checkpoint.load_params(workdir))[0]
    start = dict(jax.tree_util.tree_flatten_with_path(hf.load(hf_dir, remote_code_quirks=False).params)[0])
    assert len(trained) == len(start)
    moved, merger = [], []
    for path, value in trained:
        name = "/".join(str(k.key) for k in path)
        if name.startswith("merger/"):
            merger.append(name)
        before = np.asarray(start[path])
        assert value.shape == before.shape, name
        if not np.array_equal(np.asarray(value), before):
            moved.append(name)
    assert merger and moved == merger, (moved, merger)   # every merger param moved, nothing else did
