"""Stage 1 (alignment): train the projector (`merger`) only; ViT and LLM stay bit-identical.

Recipe (spec/model.md section 7): lr 1e-4, weight decay 0, beta2 0.99, eps 1e-5, clip 1.0, warmup 0.002,
cosine to 1e-6, global batch 8 packed rows, 2500 steps.

Rows hold as many caption samples as the 8192-token budget allows (the upstream averages ~28 per row): the
4b/8b presets take up to 64 images per row and a ViT buffer of 4 x seq_len = 32768 patches (every token of a
row could be an image token), the budgets of

    python -m ovjax pack --input data/raw-captions --out data/packed-s1 --seq-len 8192 --max-patches 32768 \
        --max-segments 64 --max-images 64

    python -m ovjax train --config configs/stage1.py:tiny --workdir /tmp/ov-stage1-tiny
    python -m ovjax train --config configs/stage1.py:8b --workdir DIR --config.mesh.fsdp=-1

arg = model preset: tiny | 4b | 8b. The tiny run takes seconds on a CPU.
"""

from ovjax.train.config import base_config


def get_config(arg: str = "tiny"):
    cfg = base_config(arg or "tiny")
    cfg.optim.update(dict(lr=1e-4, weight_decay=0.0, b2=0.99, trainable=("merger",), frozen=()))
    if cfg.model.name != "tiny":
        cfg.train.update(dict(steps=2500, batch_size=8, log_every=10, max_patches=32768, max_images=64))
    return cfg
