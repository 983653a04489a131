"""`python -m ovjax import`: a hub directory -> a workdir that `train` starts a stage from.

    python -m ovjax import --hf HFDIR --out WORKDIR [--preset 4b] [--dtype float32]
    python -m ovjax train --config configs/stage1_5.py:4b --workdir NEW --config.init.from_checkpoint=WORKDIR

The tensors are streamed into an FSDP layout over all local devices and saved as step 0 of an Orbax checkpoint
(params only, no optimizer state) whose meta carries the model config (named after the preset it equals field
by field, else `--preset`, else "imported"; train compares the fields themselves) and the processor's pixel
budget; tokenizer files go to WORKDIR/tokenizer, so a later `export` of the workdir finds them. The CLS quirk of
the released remote code is off (training strips CLS tokens correctly).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types

import jax
import ml_collections
import numpy as np

from ovjax import checkpoint, sharding
from ovjax.configs import models as model_configs
from ovjax.hf.files import CheckpointError, read_json
from ovjax.hf.loading import load
from ovjax.hf.sidefiles import TOKENIZER_FILES, find_tokenizer_dir
from ovjax.hf.writer import copy_files

_MODEL_KEYS = ("vision", "text", "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def _model_fields(cfg) -> dict:
    d = json.loads(ml_collections.ConfigDict(cfg).to_json())
    return {k: d.get(k) for k in _MODEL_KEYS}


def matching_preset(cfg) -> str | None:
    mine = _model_fields(cfg)
    for name, make in model_configs.PRESETS.items():
        if _model_fields(make()) == mine:
            return name
    return None


def import_hf(hf_dir: str, out: str, *, preset: str | None = None, dtype: str = "float32", log=print) -> str:
    mesh = sharding.fully_sharded_mesh()
    model = load(hf_dir, dtype, remote_code_quirks=False, mesh=mesh)
    cfg = ml_collections.ConfigDict(model.cfg.to_dict())
    found = matching_preset(cfg)
    if found is None and preset is not None:
        log(f"note: {hf_dir} differs from the {preset} preset in some model field; train will name which")
    cfg.name = found or preset or "imported"
    directory = checkpoint.checkpoint_dir(out)
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"{directory} already holds checkpoints; choose a new --out")
    ckpt = checkpoint.Checkpointer(directory, async_save=False)
    state = types.SimpleNamespace(params=model.params, step=np.int32(0), opt_state={})
    tok_dir = os.path.join(out, "tokenizer")
    copied = copy_files(hf_dir, tok_dir, TOKENIZER_FILES) if find_tokenizer_dir(hf_dir) else []
    data = {"tokenizer": tok_dir if copied else ""}
    proc = os.path.join(hf_dir, "preprocessor_config.json")
    if os.path.isfile(proc):
        pp = read_json(proc)
        data.update(min_pixels=pp.get("min_pixels", 0), max_pixels=pp.get("max_pixels", 0))
    meta = {"step": 0, "counters": {}, "imported_from": str(hf_dir),
            "config": json.dumps({"model": cfg.to_dict(), "data": data})}
    try:
        ckpt.save(0, state, None, meta)
        ckpt.wait()
    finally:
        ckpt.close()
    log(f"imported {hf_dir} -> {directory} (model {cfg.name}, {dtype}, mesh {dict(mesh.shape)})")
    return str(directory)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ovjax import", description=__doc__.split("\n")[0])
    ap.add_argument("--hf", required=True, help="hub directory (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="new workdir")
    ap.add_argument("--preset", default=None, choices=sorted(model_configs.PRESETS))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args(argv)
    try:
        import_hf(args.hf, args.out, preset=args.preset, dtype=args.dtype)
    except (CheckpointError, checkpoint.CheckpointError) as e:
        print(f"import: {e}", file=sys.stderr)
        return 1
    return 0
