"""`python -m ovjax export`: a training run's Orbax params -> a hub directory transformers / lmms-eval load.

    python -m ovjax export --checkpoint WORKDIR [--step N] --out HFDIR [--dtype bfloat16] [--tokenizer DIR]
                           [--max-shard-gb 5]

Only the `params` item of the step is read (never the optimizer state); LoRA adapters (model.lora.rank > 0)
are folded into their kernels, W + (alpha / rank) A B, so the export is a plain model; tensors are converted and written one
at a time (peak host memory: the restored params + about one tensor). The directory gets config.json (sizes
from the tensors, the released `auto_map`), safetensors (sharded with an index beyond the cap), tokenizer
files, chat_template.jinja, generation_config.json and preprocessor_config.json (the run's min/max pixels);
then every written tensor is reread and compared byte for byte with a fresh conversion of the params.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import ml_collections

from ovjax import checkpoint
from ovjax.data import images
from ovjax.hf import sidefiles
from ovjax.hf.files import CheckpointError
from ovjax.hf.writer import write_hf
from ovjax.models import lora


def run_config(workdir: str, step: int | None) -> tuple[ml_collections.ConfigDict, dict]:
    meta = checkpoint.read_meta(workdir, step)
    if "config" not in meta:
        raise CheckpointError(f"{workdir}: the checkpoint's meta holds no run config")
    return ml_collections.ConfigDict(json.loads(meta["config"])), meta


def pixel_budget(run_cfg) -> tuple[int, int]:
    data = run_cfg.get("data") or {}
    return int(data.get("min_pixels") or images.MIN_PIXELS), int(data.get("max_pixels") or images.MAX_PIXELS)


def export(workdir: str, out: str, *, step: int | None = None, dtype: str | None = None,
           tokenizer: str | None = None, max_shard_bytes: int = 5 * 1024 ** 3, log=print) -> dict:
    run_cfg, meta = run_config(workdir, step)
    model_cfg = run_cfg.model
    params = checkpoint.load_params(workdir, step=step)
    if os.path.exists(out) and os.listdir(out):
        raise CheckpointError(f"{out} exists and is not empty; choose a new --out")
    if lora.enabled(model_cfg):
        params = lora.merged(params, model_cfg.lora)
        log(f"folded the LoRA adapters (rank {model_cfg.lora.rank}, alpha {model_cfg.lora.alpha}) into the kernels")
        model_cfg = lora.without_lora(model_cfg)
    os.makedirs(out, exist_ok=True)
    dt = dtype or model_cfg.get("param_dtype", "float32")
    from ovjax.models.vlm import dtype_of
    hub = write_hf(model_cfg, params, out, dtype=dtype_of(dt), max_shard_bytes=max_shard_bytes, verify="values")
    data = run_cfg.get("data") or {}
    tok_dir = sidefiles.find_tokenizer_dir(tokenizer, data.get("tokenizer"), *_run_tokenizers(workdir))
    lo, hi = pixel_budget(run_cfg)
    written = sidefiles.write_side_files(out, tokenizer_dir=tok_dir, min_pixels=lo, max_pixels=hi,
                                         cfg=model_cfg, log=log)
    log(f"exported step {meta.get('step')} of {workdir} -> {out} ({dt}; {', '.join(written)}); tensors verified")
    return hub


def _run_tokenizers(workdir: str) -> list[str]:
    """Tokenizer directories a run made for itself (the synthetic dataset's, under WORKDIR/data)."""
    found = []
    for root, _, names in os.walk(os.path.join(workdir, "data")):
        if "tokenizer.json" in names:
            found.append(root)
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ovjax export", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="the run's workdir (or its checkpoints folder)")
    ap.add_argument("--step", type=int, default=None, help="default: the latest complete step")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="stored dtype (default: the run's param dtype)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the run's)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    args = ap.parse_args(argv)
    try:
        export(args.checkpoint, args.out, step=args.step, dtype=args.dtype, tokenizer=args.tokenizer,
               max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
    except (CheckpointError, checkpoint.CheckpointError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 1
    return 0
