"""Default config sections of a training run (`configs/stage*.py` start from these).

Sections: model (a preset of configs/models.py), mesh, optim, train, checkpoint, data.
"""

from __future__ import annotations

import ml_collections

from ovjax.configs.models import preset


def mesh_config(data: int = 1, fsdp: int = -1, tensor: int = 1, sequence: int = 1) -> ml_collections.ConfigDict:
    """Mesh axis sizes; exactly one may be -1 (it takes the remaining devices)."""
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, sequence=sequence))


def optim_config(**kw) -> ml_collections.ConfigDict:
    """AdamW recipe (spec/model.md section 7 common settings); see ovjax/train/optim.py for the fields."""
    cfg = ml_collections.ConfigDict(dict(
        lr=1e-5, min_lr=1e-6, warmup_fraction=0.002, warmup_steps=-1,
        b1=0.9, b2=0.99, eps=1e-5, weight_decay=0.0, clip_norm=1.0,
        trainable=("visual", "merger", "language_model"), frozen=(),
        # per-prefix peak learning rates; None = optim.lr
        groups=ml_collections.ConfigDict(dict(visual=None, merger=None, language_model=None)),
    ))
    cfg.update(kw)
    return cfg


def train_config(**kw) -> ml_collections.ConfigDict:
    """One step consumes `batch_size` packed rows of `seq_len` tokens (split into `micro_batches`)."""
    cfg = ml_collections.ConfigDict(dict(
        steps=100, log_every=10, micro_batches=1, batch_size=8, seq_len=8192,
        max_patches=16368, max_images=16,   # ViT buffer per row; CLS slots per row
        loss_chunk=1024,                    # tokens per chunk of the chunked cross-entropy
        seed=0,
    ))
    cfg.update(kw)
    return cfg


def checkpoint_config(every: int = 500, keep: int = 3) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(every=every, keep=keep))


def data_config(**kw) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(seed=0, train="", eval=""))  # paths: placeholders (ovjax.data)
    cfg.update(kw)
    return cfg


def model_config(name: str, **runtime) -> ml_collections.ConfigDict:
    """A model preset; big presets default to bf16 compute, full remat and the automatic attention kernel."""
    cfg = preset(name)
    if name != "tiny":
        cfg.update(dict(dtype="bfloat16", remat="full", attention_impl="auto"))
    cfg.update(runtime)
    return cfg


def base_config(model: str = "tiny") -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = model_config(model)
    cfg.mesh = mesh_config()
    cfg.optim = optim_config()
    cfg.train = train_config()
    cfg.checkpoint = checkpoint_config()
    cfg.data = data_config()
    if model == "tiny":
        cfg.train.update(dict(steps=20, log_every=5, batch_size=8, seq_len=64, max_patches=64, max_images=4,
                              loss_chunk=32))
        cfg.checkpoint.update(dict(every=10, keep=2))
    return cfg
