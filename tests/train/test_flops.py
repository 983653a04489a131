"""FLOPs accounting against a count by hand for a tiny shape, and XLA's cost analysis as a sanity bound."""

import jax
import numpy as np

from ovjax.configs.models import preset
from ovjax.data import batch as batch_lib
from ovjax.models import vlm
from ovjax.train import flops

# tiny preset: ViT D=48, I=96, depth 2, 588 values per patch; merger 4x48 -> 192 -> 64;
# LLM H=64, heads 4 (kv 2) x 16, I=112, 2 layers, V=160.
SEGMENTS = np.array([[1, 1, 1, 1, 1, 2, 2, 0]])          # samples of 5 and 2 tokens, one pad
PATCHES = np.array([[1, 1, 1, 1, 2, 2, 2, 2]])           # two images of 4 patches (+ one CLS each)

VIT_EMBED = 2 * 588 * 48 * 8
VIT_DENSE = 2 * 2 * (4 * 48 * 48 + 2 * 48 * 96) * (8 + 2)
VIT_ATTN = 2 * 4 * 48 * (5 * 5 + 5 * 5)
MERGER = 2 * (192 * 192 + 192 * 64) * 2
LLM_DENSE = 2 * (2 * 64 * (4 + 2 * 2) * 16 + 2 * 4 * 16 * 64 + 6 * 64 * 112) * 7
LLM_ATTN = 2 * 4 * 4 * 16 * (5 * 6 // 2 + 2 * 3 // 2)
HEAD = 2 * 64 * 160 * 7


def test_counts_by_hand():
    cfg = preset("tiny")
    f = flops.step_flops(cfg, 1, 8, 8, 2, segment_ids=SEGMENTS, patch_segment=PATCHES, remat="full")
    fwd = VIT_EMBED + VIT_DENSE + VIT_ATTN + MERGER + LLM_DENSE + LLM_ATTN + HEAD
    assert fwd == 2503424
    assert f["forward"] == fwd
    assert f["train"] == 3 * fwd
    assert f["recompute"] == VIT_DENSE + VIT_ATTN + LLM_DENSE + LLM_ATTN + HEAD
    assert f["hardware"] == f["train"] + f["recompute"]
    assert f["tokens"] == 7

    # stage 1: only the merger trains; the ViT runs forward only, the LLM computes input grads only
    s1 = flops.step_flops(cfg, 1, 8, 8, 2, segment_ids=SEGMENTS, patch_segment=PATCHES, remat="full",
                          trainable=("merger",))
    assert s1["train"] == (VIT_EMBED + VIT_DENSE + VIT_ATTN) + 3 * MERGER + 2 * (LLM_DENSE + HEAD) + 3 * LLM_ATTN
    assert s1["recompute"] == LLM_DENSE + LLM_ATTN + HEAD
    assert flops.step_flops(cfg, 1, 8, 8, 2, segment_ids=SEGMENTS, patch_segment=PATCHES,
                            remat="dots")["recompute"] == HEAD
    # save_attention keeps the flash forward's output: everything but attention is recomputed
    assert flops.step_flops(cfg, 1, 8, 8, 2, segment_ids=SEGMENTS, patch_segment=PATCHES,
                            remat="save_attention")["recompute"] == VIT_DENSE + LLM_DENSE + HEAD
    assert flops.step_flops(cfg, 1, 8, 8, 2, segment_ids=SEGMENTS, patch_segment=PATCHES,
                            remat="dots_attention")["recompute"] == HEAD

    # dense: every token, (P + M)^2 ViT pairs, causal half T(T+1)/2
    d = flops.step_flops(cfg, 1, 8, 8, 2, remat="none")
    assert d["forward_parts"]["language_model"]["attention"] == 2 * 4 * 4 * 16 * (8 * 9 // 2)
    assert d["forward_parts"]["visual"]["attention"] == 2 * 4 * 48 * (10 * 10)
    assert d["forward_parts"]["language_model"]["head"] == 2 * 64 * 160 * 8


def test_xla_cost_analysis_bound():
    # one layer each: XLA's cost analysis counts a while-loop body once, whatever the trip count
    cfg = preset("tiny")
    cfg.vision.depth, cfg.text.num_layers = 1, 1
    c = vlm.freeze(cfg)
    b, t, p, m = 2, 32, 16, 2
    batch = batch_lib.struct(cfg, b, t, p)
    params = jax.eval_shape(lambda: vlm.init_params(cfg, jax.random.PRNGKey(0)))

    def forward(params, x):
        h, _ = vlm.VLM(c).apply({"params": params}, x["tokens"], x["positions"], x["segment_ids"], x["patches"],
                                x["patch_segment"], x["patch_hw"], num_images=m)
        return vlm.VLM(c).apply({"params": params}, h, method=vlm.VLM.logits)
    cost = jax.jit(forward).lower(params, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ours = flops.step_flops(c, b, t, p, m)["forward"]
    # XLA adds elementwise work and computes the full (not causal-half) attention matrix
    assert ours <= cost["flops"] <= 1.25 * ours, (ours, cost["flops"])
