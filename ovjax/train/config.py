"""The whole schema of a training run (`configs/stage*.py` start from these; nothing adds fields later).

Sections: model (a preset of configs/models.py), mesh, optim, train, checkpoint, init, data, eval.
`validate(cfg)` checks what the loop needs of them.
"""

from __future__ import annotations

import ml_collections

from ovjax.config import ConfigError
from ovjax.configs.models import preset

MU_DTYPES = ("float32", "bfloat16")
OFFLOAD = ("none", "opt_state")


def mesh_config(data: int = 1, fsdp: int = -1, tensor: int = 1, sequence: int = 1,
                fsdp_across_hosts: bool = False) -> ml_collections.ConfigDict:
    """Mesh axis sizes; exactly one may be -1 (it takes the remaining devices). fsdp_across_hosts: on several
    hosts an outer part of fsdp may span hosts when data alone cannot (ovjax.sharding.make_mesh)."""
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, sequence=sequence,
                                          fsdp_across_hosts=fsdp_across_hosts))


def optim_config(**kw) -> ml_collections.ConfigDict:
    """AdamW recipe (spec/model.md section 7 common settings); see ovjax/train/optim.py for the fields."""
    cfg = ml_collections.ConfigDict(dict(
        lr=1e-5, min_lr=1e-6, warmup_fraction=0.002, warmup_steps=-1,
        b1=0.9, b2=0.99, eps=1e-5, weight_decay=0.0, clip_norm=1.0,
        trainable=("visual", "merger", "language_model"), frozen=(),
        frozen_dtype="",                    # "" | "bfloat16": frozen params held in bf16 (LoRA's base)
        # per-prefix peak learning rates; None = optim.lr
        groups=ml_collections.ConfigDict(dict(visual=None, merger=None, language_model=None)),
        mu_dtype="float32",                 # Adam first moment: float32 | bfloat16 (halves mu; nu stays float32)
        offload="none",                     # none | opt_state (Adam moments in pinned host memory between steps)
    ))
    cfg.update(kw)
    return cfg


def train_config(**kw) -> ml_collections.ConfigDict:
    """One step consumes `batch_size` packed rows of `seq_len` tokens (split into `micro_batches`)."""
    cfg = ml_collections.ConfigDict(dict(
        steps=100, log_every=10, micro_batches=1, batch_size=8, seq_len=8192,
        max_patches=16368, max_images=16,   # ViT buffer per row; CLS slots per row
        loss_chunk=1024,                    # tokens per chunk of the chunked cross-entropy
        max_segments=0,                     # samples per packed row the loader accepts (0 = no limit)
        seed=0,                             # random init
        on_nonfinite="stop",                # stop | skip (skip: the update is dropped, the step still counts)
        peak_flops=0.0,                     # per-device peak FLOP/s for MFU; 0 = table / measured (metrics.py)
        progress="auto",                    # auto | bar | lines
        xla_compiler_options="",            # "name=value,..." for the step's jit (xla_backend_optimization_level=0)
    ))
    cfg.update(kw)
    return cfg


def checkpoint_config(every: int = 500, keep: int = 3) -> ml_collections.ConfigDict:
    """Orbax checkpoints under DIR/checkpoints every `every` steps and at the end; the `keep` latest kept."""
    return ml_collections.ConfigDict(dict(every=every, keep=keep, async_save=True))


def init_config() -> ml_collections.ConfigDict:
    """Where a fresh run (no checkpoint in its workdir) starts: at most one of these; neither = random init."""
    return ml_collections.ConfigDict(dict(
        from_checkpoint="",                 # a previous stage's workdir: its params, a fresh optimizer
        from_hf="",                         # a hub-layout directory (ovjax.hf)
    ))


def data_config(**kw) -> ml_collections.ConfigDict:
    """`train`: a packed directory (`python -m ovjax pack`); empty = the synthetic set described by the
    `synthetic*` fields, made up front by `python -m ovjax synth` (tiny/demo models only)."""
    cfg = ml_collections.ConfigDict(dict(
        seed=0, train="", eval="",
        workers=0,                          # Grain worker processes of the loader
        min_pixels=3136, max_pixels=0,      # the conversion's image budget (0: the synthetic set's own)
        tokenizer="",                       # tokenizer dir to check the model's ids against ("" = via manifests)
        synthetic="caption",                # caption | qa
        synthetic_samples=2000,
        synthetic_max_turns=0,              # 0: 1 turn below 128 tokens a row, else 4
        synthetic_root="",                  # where the synthetic set is made / reused ("" = DIR/data)
    ))
    cfg.update(kw)
    return cfg


def eval_config(every: int = 0, batches: int = 0) -> ml_collections.ConfigDict:
    """Held-out evaluation of `data.eval` (ovjax/train/evaluate.py) every `every` steps and at the last step
    (every=0: the last step only); `batches` caps the batches scored (0 = the whole set)."""
    return ml_collections.ConfigDict(dict(every=every, batches=batches))


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
    cfg.init = init_config()
    cfg.data = data_config()
    cfg.eval = eval_config()
    if model == "tiny":
        cfg.train.update(dict(steps=20, log_every=5, batch_size=8, seq_len=64, max_patches=64, max_images=4,
                              loss_chunk=32))
        cfg.checkpoint.update(dict(every=10, keep=2))
    return cfg


def validate(cfg) -> None:
    """Raise ConfigError naming the first field the loop cannot use."""
    t, c = cfg.train, cfg.checkpoint
    for section, key in (("train", "steps"), ("train", "batch_size"), ("train", "seq_len"), ("train", "log_every"),
                         ("checkpoint", "every")):
        v = cfg[section][key]
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{section}.{key} must be a positive int, got {v!r}")
    for key, allowed in (("on_nonfinite", ("stop", "skip")), ("progress", ("auto", "bar", "lines"))):
        if t[key] not in allowed:
            raise ConfigError(f"train.{key} must be one of {allowed}, got {t[key]!r}")
    for key, allowed in (("mu_dtype", MU_DTYPES), ("offload", OFFLOAD)):
        v = cfg.optim.get(key, allowed[0])
        if v not in allowed:
            raise ConfigError(f"optim.{key} must be one of {allowed}, got {v!r}")
    if c.keep is not None and c.keep < 1:
        raise ConfigError(f"checkpoint.keep must be >= 1, got {c.keep}")
    if cfg.init.from_checkpoint and cfg.init.from_hf:
        raise ConfigError("set at most one of init.from_checkpoint and init.from_hf")
    if cfg.data.eval:
        for key in ("every", "batches"):
            v = cfg.eval.get(key) if "eval" in cfg else None
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"data.eval is set: eval.{key} must be an int >= 0, got {v!r}")
    _validate_lora(cfg)
    if t.batch_size % t.micro_batches:
        raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by train.micro_batches {t.micro_batches}")


def _validate_lora(cfg) -> None:
    from ovjax.models import lora
    from ovjax.train import optim

    try:
        lora.validate(cfg.model.get("lora"))
        optim.frozen_dtype(cfg.optim)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    selected = optim.LORA_SELECTOR in tuple(cfg.optim.trainable)
    if lora.enabled(cfg.model) and not selected:
        raise ConfigError(f"model.lora.rank={cfg.model.lora.rank} but optim.trainable "
                          f"{tuple(cfg.optim.trainable)} lacks 'lora': the adapters would never train")
    if selected and not lora.enabled(cfg.model):
        raise ConfigError("optim.trainable names 'lora' but model.lora.rank is 0 (no adapters)")
