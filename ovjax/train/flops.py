"""FLOPs of a train step (ViT + projector + LLM, attention included) for MFU reporting.

Counting (a multiply-add = 2 FLOPs; matmuls and attention only; norms, rotary, softmax are left out):
- ViT, per token (patches and one CLS per image): 2(4D^2 + 2DI) per layer, plus 2*588*D per patch for the
  patch embedding; attention 4*D per (query, key) pair per layer, pairs = sum over images of L^2 with
  L = patches + 1 (bidirectional).
- Merger, per merged feature (4 patches): 2(4D*4D + 4D*H).
- LLM, per token per layer: 2H(hq + 2 hkv)hd + 2 hq hd H + 6 H I; attention 4 hq hd per causal pair,
  pairs = sum over packed samples of L(L+1)/2; the vocabulary projection 2HV per token.
With segments given (`segment_ids` [B, T], `patch_segment` [B, P]) only real tokens and real segments count
(padding is not useful work); without them the dense buffers count: every token, P + max_images ViT tokens
per row with (P + M)^2 pairs, and the dense causal half T(T+1)/2 for the LLM.

Train = forward + backward, backward = 2x forward (weight grads + input grads), so 3x forward when all
trains. With frozen towers (`trainable`) weight grads of a frozen part are not computed and nothing at
all flows into a part that has no trainable part at or before it (stage 1: the ViT runs forward only).
Rematerialisation recompute is reported on its own: `full` recomputes the block forwards, `dots` saves every
matmul (no matmul recompute), `dots_no_batch` recomputes the attention matmuls; the chunked loss always
recomputes its vocabulary projection in the backward pass.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PARTS = ("visual", "merger", "language_model")


def _segment_lengths(segment_ids) -> list[np.ndarray]:
    """int [B, N] -> per row the lengths of segments 1.. (0 = padding is skipped)."""
    out = []
    for row in np.asarray(segment_ids):
        ids = row[row > 0]
        out.append(np.unique(ids, return_counts=True)[1].astype(np.int64) if ids.size else np.zeros(0, np.int64))
    return out


def vision_forward(v, n_patches: float, n_cls: float, pairs: float) -> dict:
    d, i = v.hidden_size, v.intermediate_size
    pix = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    return {"patch_embed": float(2 * pix * d * n_patches),
            "dense": float(v.depth * 2 * (4 * d * d + 2 * d * i) * (n_patches + n_cls)),
            "attention": float(v.depth * 4 * d * pairs)}


def merger_forward(v, out_hidden: int, n_features: float) -> float:
    g = v.spatial_merge_size ** 2 * v.hidden_size
    return float(2 * (g * g + g * out_hidden) * n_features)


def text_forward(t, n_tokens: float, causal_pairs: float) -> dict:
    h, hd, hq, hkv, i = t.hidden_size, t.head_dim, t.num_heads, t.num_kv_heads, t.intermediate_size
    per_token = 2 * h * (hq + 2 * hkv) * hd + 2 * hq * hd * h + 6 * h * i
    return {"dense": float(t.num_layers * per_token * n_tokens),
            "attention": float(t.num_layers * 4 * hq * hd * causal_pairs),
            "head": float(2 * h * t.vocab_size * n_tokens)}


def step_flops(model_cfg, batch_size: int, seq_len: int, max_patches: int = 0, max_images: int = 0, *,
               segment_ids=None, patch_segment=None, remat: str | None = None,
               trainable: Sequence[str] = PARTS) -> dict:
    """FLOPs of one train step on a global batch. Returns forward (per part), train (forward + backward),
    recompute (remat), hardware (train + recompute), all floats."""
    t, v = model_cfg.text, model_cfg.vision
    remat = model_cfg.get("remat", "none") if remat is None else remat
    if segment_ids is not None:
        lens = _segment_lengths(segment_ids)
        n_tok = float(sum(x.sum() for x in lens))
        causal = float(sum((x * (x + 1) // 2).sum() for x in lens))
    else:
        n_tok = float(batch_size * seq_len)
        causal = float(batch_size * seq_len * (seq_len + 1) // 2)
    fwd = {}
    if v is not None and max_patches:
        if patch_segment is not None:
            plens = _segment_lengths(patch_segment)
            n_patch = float(sum(x.sum() for x in plens))
            n_cls = float(sum(len(x) for x in plens))
            pairs = float(sum(((x + 1) ** 2).sum() for x in plens))
        else:
            n_patch, n_cls = float(batch_size * max_patches), float(batch_size * max_images)
            pairs = float(batch_size * (max_patches + max_images) ** 2)
        fwd["visual"] = vision_forward(v, n_patch, n_cls, pairs)
        fwd["merger"] = {"dense": merger_forward(v, t.hidden_size, n_patch / v.spatial_merge_size ** 2),
                         "attention": 0.0}
    fwd["language_model"] = text_forward(t, n_tok, causal)

    for name in trainable:
        if name not in PARTS:
            raise ValueError(f"trainable part {name!r} is not one of {PARTS}")
    train = recompute = 0.0
    flowing = False  # does a gradient flow through this part (something trainable at or before it)?
    for name in PARTS:
        if name not in fwd:
            continue
        part = fwd[name]
        flowing = flowing or name in trainable
        weights = part["dense"] + part.get("patch_embed", 0.0) + part.get("head", 0.0)
        f = weights + part["attention"]
        train += f
        if flowing:
            train += weights * (2 if name in trainable else 1) + 2 * part["attention"]
            if name != "merger":
                if remat == "full":
                    recompute += part["dense"] + part["attention"]
                elif remat == "dots_no_batch":
                    recompute += part["attention"]
                elif remat == "save_attention":  # the flash forward's output and LSE are saved
                    recompute += part["dense"]
                elif remat not in ("none", "dots", "dots_attention"):
                    raise ValueError(f"remat policy {remat!r} is not one of none, full, dots, dots_no_batch, "
                                     "save_attention, dots_attention")
            recompute += part.get("head", 0.0)  # the chunked loss recomputes its logits
    forward = sum(sum(p.values()) for p in fwd.values())
    return {"forward": forward, "forward_parts": fwd, "train": train, "recompute": recompute,
            "hardware": train + recompute, "tokens": n_tok}


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation: achieved / peak (pass `train` FLOPs for MFU, `hardware` for HFU)."""
    return flops_per_step / step_seconds / (num_devices * peak_flops_per_device)
