"""`python -m ovjax assemble`: the stage-0 checkpoint from a RICE-ViT (transformers `mlcd` layout) and a Qwen3.

    python -m ovjax assemble --vision MLCD_DIR --llm QWEN3_DIR --out HFDIR [--seed 0] [--dtype float32]
                             [--tokenizer DIR] [--min-pixels 3136] [--max-pixels 2560000]

The LLM's head is untied (a tied LLM's head starts as a copy of its embeddings, as the released 4B's did), the
projector is fresh (seeded), special-token ids are the tokenizer's (Qwen2's when there is none). Tokenizer files
come from the LLM directory (or --tokenizer); chat template, generation and processor configs are written.
"""

from __future__ import annotations

import argparse
import os
import sys

from ovjax.configs.models import ConfigError
from ovjax.data import images
from ovjax.data.tokenizer import TokenizerError
from ovjax.hf import sidefiles
from ovjax.hf.files import CheckpointError
from ovjax.hf.stage0 import assemble_stage0
from ovjax.hf.writer import write_hf


def assemble(vision: str, llm: str, out: str, *, seed: int = 0, dtype: str = "float32", tokenizer: str | None = None,
             min_pixels: int = images.MIN_PIXELS, max_pixels: int = images.MAX_PIXELS, log=print) -> str:
    if os.path.exists(out) and os.listdir(out):
        raise CheckpointError(f"{out} exists and is not empty; choose a new --out")
    tok = sidefiles.find_tokenizer_dir(tokenizer, llm)
    model = assemble_stage0(vision, llm, seed=seed, dtype=dtype, tokenizer=tok)
    write_hf(model.cfg, model.params, out)
    written = sidefiles.write_side_files(out, tokenizer_dir=tok, min_pixels=min_pixels, max_pixels=max_pixels,
                                         cfg=model.cfg if tok else None, log=log)
    log(f"assembled {vision} + {llm} -> {out} ({', '.join(written)})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ovjax assemble", description=__doc__.split("\n")[0])
    ap.add_argument("--vision", required=True, help="MLCDVisionModel directory (RICE-ViT)")
    ap.add_argument("--llm", required=True, help="Qwen3ForCausalLM directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--min-pixels", type=int, default=images.MIN_PIXELS)
    ap.add_argument("--max-pixels", type=int, default=images.MAX_PIXELS)
    args = ap.parse_args(argv)
    try:
        assemble(args.vision, args.llm, args.out, seed=args.seed, dtype=args.dtype, tokenizer=args.tokenizer,
                 min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    except (CheckpointError, ConfigError, TokenizerError) as e:   # e.g. token ids outside the LLM's vocabulary
        print(f"assemble: {e}", file=sys.stderr)
        return 1
    return 0
