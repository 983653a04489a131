"""Stage 2 (instruction tuning): ViT + projector + LLM all train.

Recipe (spec/model.md section 7): lr 1e-5, weight decay 0, beta2 0.99, eps 1e-5, clip 1.0, warmup 0.002,
cosine to 1e-6, global batch 224 rows, 3500 steps. CLS embedding and angles stay frozen (as upstream).
Images: the upstream caps the longest side at 1000 px before smart_resize (`convert --max-side 1000`); rows
take the default budgets (16368 patches, 16 images):

    python -m ovjax convert --wds 'data/sft/*.tar' --tokenizer TOK --out data/raw-sft --max-side 1000
    python -m ovjax pack --input data/raw-sft --out data/packed-s2 --seq-len 8192 --max-patches 16368 \
        --max-segments 64 --max-images 16

    python -m ovjax train --config configs/stage2.py:tiny --workdir /tmp/ov-stage2-tiny
    python -m ovjax train --config configs/stage2.py:8b --workdir DIR --config.mesh.fsdp=-1

arg = model preset: tiny | 4b | 8b.
"""

from ovjax.train.config import base_config


def get_config(arg: str = "tiny"):
    cfg = base_config(arg or "tiny")
    cfg.optim.update(dict(lr=1e-5, weight_decay=0.0, b2=0.99,
                          trainable=("visual", "merger", "language_model"),
                          frozen=("visual/class_embedding", "visual/class_pos_emb")))
    if cfg.model.name != "tiny":
        cfg.train.update(dict(steps=3500, batch_size=224, micro_batches=1, log_every=10))
    cfg.data.synthetic = "qa"  # the tiny preset's default data: synthetic questions (ovjax/data/synthetic.py)
    return cfg
