"""The data of a run: which packed set it reads, whether the model's token ids fit that set's tokenizer,
and the loader over it. Nothing here edits a config: a set made up front yields a NEW frozen config.

`prepare(cfg, workdir)`: with `data.train` set, checks it is a packed directory and that the model's
vocabulary and special-token ids fit the data's tokenizer (`data.tokenizer`, else the one named by the
packed -> raw manifests). With `data.train` empty (tiny/demo models only) it first runs the synthetic-data
verb (`python -m ovjax synth`, ovjax/data/synthetic.py) as its own logged step, then returns the config with
data.train, data.tokenizer, data.max_pixels and the model's vocabulary and special-token ids set from what
that step made, exactly as if they had been given as `--config.*` overrides.
"""

from __future__ import annotations

import json
from pathlib import Path

from ovjax import config
from ovjax.config import ConfigError

SYNTHETIC_MODELS = ("tiny", "demo")  # model names that default to the synthetic dataset


def prepare(cfg, workdir: Path, log=print):
    """-> (the run's frozen config, the packed directory it reads)."""
    if not cfg.data.train:
        cfg = with_synthetic_data(cfg, Path(cfg.data.synthetic_root or Path(workdir) / "data"), log)
    return cfg, check_packed(cfg, log)


def with_synthetic_data(cfg, root: Path, log=print):
    """Make (or reuse) the synthetic set of `cfg` under `root` with the synth verb's function, and return
    the config that trains on it."""
    import jax

    from ovjax.data import synthetic

    if jax.process_count() > 1:
        raise ConfigError("data.train is empty: make the synthetic set with one process first (`python -m ovjax "
                          "synth`, then set data.train); several processes would each write it")
    if cfg.model.name not in SYNTHETIC_MODELS:
        raise ConfigError(f"data.train is empty: set --config.data.train=PACKED_DIR (only the tiny preset "
                          f"has a synthetic default; this is {cfg.model.name})")
    spec = synthetic.spec_for_run(cfg, root)
    log(f"data: data.train is empty; making the synthetic set first: {spec.command()}")
    packed, tok_dir = synthetic.make(spec, log=log)
    return config.with_values(cfg, {"data.train": str(packed), "data.tokenizer": str(tok_dir),
                                    "data.max_pixels": spec.max_pixels, **tokenizer_values(tok_dir)})


def tokenizer_values(tok_dir: str | Path) -> dict:
    """{dotted config key: value} of the model fields a tokenizer determines (vocabulary, special ids)."""
    from transformers import AutoTokenizer

    from ovjax.data import tokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = tokenizer.special_token_ids(tok)
    return {"model.text.vocab_size": len(tok), "model.image_token_id": ids["image_pad"],
            "model.video_token_id": ids["video_pad"], "model.vision_start_token_id": ids["vision_start"],
            "model.vision_end_token_id": ids["vision_end"]}


def check_packed(cfg, log=print) -> Path:
    """`data.train` as a packed directory whose tokenizer fits the model (raises ConfigError if not)."""
    p = Path(cfg.data.train)
    if not (p / "manifest.json").exists():
        raise ConfigError(f"data.train={cfg.data.train} is not a packed directory (no manifest.json); make one "
                          "with `python -m ovjax pack` (or `python -m ovjax synth`)")
    tok = Path(cfg.data.tokenizer) if cfg.data.tokenizer else find_tokenizer(p)
    if tok is not None:
        check_tokenizer(cfg, tok)
    else:
        log(f"note: could not find the tokenizer of {p} (set data.tokenizer) to check the model's token ids")
    return p


def find_tokenizer(packed_dir: Path) -> Path | None:
    """The tokenizer a packed set was made with: packed manifest -> raw manifest -> its tokenizer dir."""
    try:
        packed = json.loads((packed_dir / "manifest.json").read_text())
        raw_manifest = packed.get("inputs", {}).get("manifest")
        if not raw_manifest:
            return None
        raw = json.loads(Path(raw_manifest).read_text())
        tok = raw.get("parameters", {}).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(tok) if tok and (Path(tok) / "tokenizer.json").exists() else None


def check_tokenizer(cfg, tok_dir: Path) -> None:
    """Raise ConfigError when the model's vocabulary or special-token ids do not fit the data's tokenizer."""
    want = tokenizer_values(tok_dir)
    m = cfg.model
    problems = []
    if want["model.text.vocab_size"] > m.text.vocab_size:
        problems.append(f"the tokenizer has {want['model.text.vocab_size']} tokens, model.text.vocab_size is "
                        f"{m.text.vocab_size}")
    for field, key in (("image_token_id", "image_pad"), ("video_token_id", "video_pad"),
                       ("vision_start_token_id", "vision_start"), ("vision_end_token_id", "vision_end")):
        if m[field] != want[f"model.{field}"]:
            problems.append(f"model.{field}={m[field]} but the tokenizer's {key} id is {want[f'model.{field}']}")
    if problems:
        raise ConfigError(f"model and data tokenizer {tok_dir} disagree: " + "; ".join(problems))


def make_loader(cfg, data_dir: Path, mesh):
    from ovjax.data import images, loader

    t, d = cfg.train, cfg.data
    return loader.PackedLoader(str(data_dir), seq_len=t.seq_len, max_patches=t.max_patches,
                               global_batch_size=t.batch_size, max_images=t.max_images,
                               max_segments=t.max_segments or None, mesh=mesh, micro_batches=t.micro_batches,
                               seed=d.seed, worker_count=d.workers, min_pixels=d.min_pixels,
                               max_pixels=d.max_pixels or images.MAX_PIXELS)
