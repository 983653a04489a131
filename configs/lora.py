"""Stage-2 fine-tuning with LoRA adapters: the base model frozen (held in bf16 for the big presets), rank-16
adapters on every LLM projection, the projector trained in full.

Starts from a previous stage's workdir or a hub directory (adapters start at B = 0, so step 0 is the base
model exactly); `export` folds the adapters into the kernels:

    python -m ovjax train --config configs/lora.py:8b --workdir DIR --config.init.from_hf=HFDIR \\
        --config.data.train=data/packed-s2
    python -m ovjax export --checkpoint DIR --out DIR/hf          # merged: W + (alpha / rank) A B

    python -m ovjax train --config configs/lora.py:tiny --workdir /tmp/ov-lora-tiny   # synthetic data, CPU

Options: --config.model.lora.rank=R, .alpha=A, .targets=q_proj,v_proj, .vision_targets=qkv,proj,fc1,fc2
(adapters in the ViT too); --config.optim.trainable=lora (projector frozen as well).
Memory: `python -m ovjax.bench.memory --cases 8b-lora-1dev` (README, Performance).

arg = model preset: tiny | 4b | 8b.
"""

from ovjax.configs import stage2


def get_config(arg: str = "tiny"):
    cfg = stage2.get_config(arg or "tiny")
    cfg.model.lora.update(dict(rank=16, alpha=32.0))
    cfg.optim.update(dict(trainable=("lora", "merger"), lr=2e-4, min_lr=2e-5, weight_decay=0.0))
    if cfg.model.name == "tiny":
        cfg.model.lora.update(dict(rank=8, alpha=16.0))
        cfg.optim.update(dict(lr=1e-2, min_lr=1e-3))
    else:
        cfg.optim.frozen_dtype = "bfloat16"
    return cfg
