"""Model presets: `tiny` (CPU, seconds), `4b` and `8b` (LLaVA-OneVision-1.5 numbers, spec/model.md).

Usage: `get_config("tiny")`, or from a command line `--config configs/models.py:8b`.
Each preset is a ConfigDict with `vision`, `text` and the special token ids; `validate(cfg)` checks it.
The tiny preset has the shapes of the ov15-tiny fixture (../shared/fixtures/ov15-tiny).
"""

from __future__ import annotations

import ml_collections

from ovjax.models import lora

# Qwen2 special token ids (the released checkpoints' tokenizer).
QWEN_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)


def _vision(depth, hidden, heads, mlp, out_hidden):
    return ml_collections.ConfigDict(dict(
        depth=depth, hidden_size=hidden, num_heads=heads, intermediate_size=mlp, patch_size=14,
        in_channels=3, temporal_patch_size=1, spatial_merge_size=2, layer_norm_eps=1e-5, rope_theta=10000.0,
        out_hidden_size=out_hidden,
        # The released remote code's CLS-strip offset bug (see ovjax/models/vision.py); off for training.
        remote_code_cls_shift=False,
    ))


def _text(vocab, hidden, layers, heads, kv_heads, head_dim, mlp, theta, max_pos):
    return ml_collections.ConfigDict(dict(
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, intermediate_size=mlp, rope_theta=theta, rms_norm_eps=1e-6,
        max_position_embeddings=max_pos, tie_word_embeddings=False,
    ))


def _runtime(cfg):
    # Numerics and memory knobs; not part of the checkpoint.
    cfg.dtype = "float32"          # compute dtype (params stay float32 unless param_dtype says otherwise)
    cfg.param_dtype = "float32"
    cfg.attention_impl = "xla"     # xla | pallas | cudnn | auto
    cfg.remat = "none"             # none | full | dots | dots_no_batch | save_attention | dots_attention
    cfg.lora = lora.config()       # LoRA adapters: rank 0 = none (ovjax/models/lora.py)
    return cfg


def tiny() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        name="tiny",
        vision=_vision(depth=2, hidden=48, heads=4, mlp=96, out_hidden=64),
        text=_text(vocab=160, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=112, theta=5e6,
                   max_pos=512),
        image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153,
    ))
    return _runtime(cfg)


def b4() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        name="4b",
        vision=_vision(depth=24, hidden=1024, heads=16, mlp=4096, out_hidden=2560),
        text=_text(vocab=151936, hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, mlp=9728,
                   theta=5e6, max_pos=262144),
        **QWEN_TOKENS,
    ))
    return _runtime(cfg)


def b8() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        name="8b",
        vision=_vision(depth=24, hidden=1024, heads=16, mlp=4096, out_hidden=4096),
        text=_text(vocab=151936, hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, mlp=12288,
                   theta=1e6, max_pos=40960),
        **QWEN_TOKENS,
    ))
    return _runtime(cfg)


PRESETS = {"tiny": tiny, "4b": b4, "8b": b8}


def preset(name: str) -> ml_collections.ConfigDict:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    validate(cfg)
    return cfg


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    return preset(arg or "tiny")


class ConfigError(ValueError):
    """A model config that cannot describe a working model."""


def validate(cfg) -> None:
    """Raise ConfigError naming the field when the numbers do not fit together."""
    v, t = cfg.vision, cfg.text
    problems = []
    sections = [("text", ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                          "intermediate_size"))]
    if v is not None:  # None: a text-only (plain Qwen3) model
        sections.append(("vision", ("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size",
                                    "spatial_merge_size", "out_hidden_size")))
    for section, fields in sections:
        for f in fields:
            val = cfg[section][f]
            if not isinstance(val, int) or val <= 0:
                problems.append(f"{section}.{f} must be a positive int, got {val!r}")
    if problems:
        raise ConfigError("; ".join(problems))
    if t.num_heads % t.num_kv_heads:
        problems.append(f"text.num_heads {t.num_heads} is not divisible by text.num_kv_heads {t.num_kv_heads}")
    if t.head_dim % 2:
        problems.append(f"text.head_dim {t.head_dim} must be even (rotary)")
    if cfg.get("attention_impl", "xla") not in ("xla", "pallas", "cudnn", "auto"):
        problems.append(f"attention_impl {cfg.attention_impl!r} is not one of xla, pallas, cudnn, auto")
    if v is None:
        if problems:
            raise ConfigError("; ".join(problems))
        return
    if v.hidden_size % v.num_heads:
        problems.append(f"vision.hidden_size {v.hidden_size} is not divisible by vision.num_heads {v.num_heads}")
    elif (v.hidden_size // v.num_heads) % 4:
        problems.append(f"vision head_dim {v.hidden_size // v.num_heads} must be divisible by 4 (2-D rotary)")
    if v.out_hidden_size != t.hidden_size:
        problems.append(f"vision.out_hidden_size {v.out_hidden_size} != text.hidden_size {t.hidden_size}")
    if v.temporal_patch_size != 1:
        problems.append(f"vision.temporal_patch_size must be 1 (OV-1.5), got {v.temporal_patch_size}")
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if not 0 <= cfg[name] < t.vocab_size:
            problems.append(f"{name} {cfg[name]} is outside the vocabulary (size {t.vocab_size})")
    if problems:
        raise ConfigError("; ".join(problems))


def check_grid(cfg, grid_thw) -> None:
    """Raise ConfigError if an image grid (t, h, w) cannot be merged 2x2."""
    m = cfg.vision.spatial_merge_size
    t, h, w = (int(x) for x in grid_thw)
    if t <= 0 or h <= 0 or w <= 0 or h % m or w % m:
        raise ConfigError(f"image grid {(t, h, w)} must be positive with h and w divisible by the merge size {m}")
