"""Streamed import (issue 10): a checkpoint of a few hundred MB onto 8 fake devices with fsdp=8. Each device
holds its 1/8 of every sharded tensor, and the import's peak host memory stays under the bytes the (fake,
host-resident) devices hold + 2 x the largest stored tensor + a fixed overhead.

The import runs in a fresh subprocess so that its peak RSS (VmHWM) is its own."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

VOCAB, HIDDEN, LAYERS, HEADS, HEAD_DIM, MLP = 32768, 1024, 2, 8, 128, 4096
OVERHEAD = 64 * 2 ** 20    # jax/XLA compilation of the per-leaf placement programs, allocator slack (measured: ~2 MiB)

CHILD = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from ovjax import sharding
    import ovjax.hf as hf

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    mesh = sharding.make_mesh({"fsdp": 8})
    before = status("VmRSS")
    model = hf.load(sys.argv[1], mesh=mesh)
    jax.block_until_ready(model.params)
    peak = status("VmHWM") - before
    leaves = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]:
        name = "/".join(k.key for k in path)
        leaves[name] = {"shape": list(leaf.shape), "nbytes": int(leaf.nbytes),
                        "devices": sorted(s.device.id for s in leaf.addressable_shards),
                        "shard_sizes": [int(s.data.size) for s in leaf.addressable_shards],
                        "replicated": leaf.sharding.is_fully_replicated}
    lm = model.params["language_model"]
    np.save(sys.argv[2] + "/embed.npy", np.asarray(lm["embed_tokens"]))
    np.save(sys.argv[2] + "/gate1.npy", np.asarray(lm["layers"]["gate_proj"]["kernel"][1]))
    np.save(sys.argv[2] + "/head_shard0.npy", np.asarray(lm["lm_head"].addressable_shards[0].data))
    print(json.dumps({"peak_bytes": peak, "leaves": leaves,
                      "head_index0": [[s.start, s.stop] for s in lm["lm_head"].addressable_shards[0].index]}))
""")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(0)
    cfg = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": VOCAB, "hidden_size": HIDDEN,
           "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
           "head_dim": HEAD_DIM, "intermediate_size": MLP, "rope_theta": 1e6, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu"}
    (path / "config.json").write_text(json.dumps(cfg))

    def rand(*shape):
        return rng.standard_normal(shape, dtype=np.float32)
    tensors = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "lm_head.weight": rand(VOCAB, HIDDEN),
               "model.norm.weight": rand(HIDDEN)}
    for n in range(LAYERS):
        p = f"model.layers.{n}."
        tensors.update({
            p + "input_layernorm.weight": rand(HIDDEN), p + "post_attention_layernorm.weight": rand(HIDDEN),
            p + "self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": rand(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": rand(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": rand(HIDDEN, HEADS * HEAD_DIM),
            p + "self_attn.q_norm.weight": rand(HEAD_DIM), p + "self_attn.k_norm.weight": rand(HEAD_DIM),
            p + "mlp.gate_proj.weight": rand(MLP, HIDDEN), p + "mlp.up_proj.weight": rand(MLP, HIDDEN),
            p + "mlp.down_proj.weight": rand(HIDDEN, MLP)})
    save_file(tensors, str(path / "model.safetensors"))
    largest = max(t.nbytes for t in tensors.values())
    total = sum(t.nbytes for t in tensors.values())
    refs = {"embed": tensors["model.embed_tokens.weight"], "head": tensors["lm_head.weight"],
            "gate1": tensors["model.layers.1.mlp.gate_proj.weight"]}
    return path, largest, total, refs


def test_streamed_import_onto_fsdp8(checkpoint, tmp_path):
    path, largest, total, refs = checkpoint
    assert total > 300 * 2 ** 20
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    leaves = out["leaves"]
    held = sum(v["nbytes"] for v in leaves.values())
    assert held == total
    for name, leaf in leaves.items():
        assert leaf["devices"] == list(range(8)), name
        size = int(np.prod(leaf["shape"]))
        if not leaf["replicated"]:
            assert leaf["shard_sizes"] == [size // 8] * 8, name    # each device holds its 1/8
    sharded = [n for n, v in leaves.items() if not v["replicated"]]
    assert {"language_model/embed_tokens", "language_model/lm_head",
            "language_model/layers/gate_proj/kernel"} <= set(sharded)
    # values: against the stored tensors, transformed here by hand
    assert np.array_equal(np.load(tmp_path / "embed.npy"), refs["embed"])
    assert np.array_equal(np.load(tmp_path / "gate1.npy"), refs["gate1"].T)
    (r0, r1), (c0, c1) = out["head_index0"]
    assert np.array_equal(np.load(tmp_path / "head_shard0.npy"), refs["head"].T[r0:r1, c0:c1])
    peak = out["peak_bytes"]
    bound = total + 2 * largest + OVERHEAD
    print(f"streamed import: model {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, "
          f"peak RSS growth {peak / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB)")
    assert peak <= bound
