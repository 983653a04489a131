"""Stage 1.5 (mid-training): ViT + projector + LLM all train.

Recipe (spec/model.md section 7): lr 1e-5, weight decay 0.01, beta2 0.95, eps 1e-5, clip 1.0, warmup 0.002,
cosine to 1e-6, global batch 16 packed rows, 20000 steps. As in the upstream Megatron ViT, the CLS embedding
and its rotary angles (`visual/class_embedding`, `visual/class_pos_emb`) stay frozen.

    python -m ovjax train --config configs/stage1_5.py:tiny --workdir /tmp/ov-stage15-tiny
    python -m ovjax train --config configs/stage1_5.py:8b --workdir DIR --config.mesh.fsdp=-1

arg = model preset: tiny | 4b | 8b. Memory estimate of the 8b step: `python -m ovjax.bench.memory`.
"""

from ovjax.train.config import base_config


def get_config(arg: str = "tiny"):
    cfg = base_config(arg or "tiny")
    cfg.optim.update(dict(lr=1e-5, weight_decay=0.01, b2=0.95,
                          trainable=("visual", "merger", "language_model"),
                          frozen=("visual/class_embedding", "visual/class_pos_emb")))
    if cfg.model.name != "tiny":
        cfg.train.update(dict(steps=20000, batch_size=16, log_every=10))
    return cfg
