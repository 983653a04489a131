"""`python -m ovjax train`: one training stage, resumable, observable.

    python -m ovjax train --config configs/stage1.py:tiny --workdir DIR [--config.a.b=value ...]

Config: `--config FILE.py:ARG` loads FILE with importlib and calls `get_config(ARG)`; every
`--config.a.b=value` (or `--config.a.b value`) then sets one existing field, cast to the field's type
(ints, floats, bools `true/false/1/0`, strings, tuples `a,b` or `(a, b)`, None where the field is None);
an unknown key is an error that lists the keys at that level. `run_defaults` adds the loop's own fields
(listed there) before the overrides are applied.

Data: `data.train` = a packed directory (`python -m ovjax pack`). Empty: the tiny preset trains on the
synthetic shapes dataset (ovjax/data/synthetic.py), made - tokenizer, convert, pack - under DIR/data on first
use; the tiny model then takes the tokenizer's vocabulary size and special-token ids.

Start: the latest complete checkpoint in DIR/checkpoints if there is one (exact resume: train state, data
iterator and counters); else `init.from_checkpoint` (a previous stage's workdir: params only, fresh
optimizer), else `init.from_hf` (a hub-layout directory), else random init with `train.seed`.

Non-finite loss or gradient norm: with `train.on_nonfinite=stop` (default) the run stops with an error naming
the first bad step; metrics are fetched at every log and checkpoint step, and always before a save, so a
non-finite state is never saved. With `skip`, such updates are dropped (params and optimizer state kept) and
counted in `skipped_updates`.

Outputs under DIR: checkpoints/ (Orbax, every `checkpoint.every` steps and at the end, `checkpoint.keep`
kept), metrics.jsonl (one object per logged step), tb/ (TensorBoard), config.json (the resolved config).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections

REPO = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A config file, argument or override that cannot be used."""


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/inf and the run is configured to stop."""


# ------------------------------------------------------------------------------------------- config

def _load_module(path: str):
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (REPO / p).exists():
        p = REPO / p  # `configs/stage1.py` works from any working directory
    if not p.exists():
        raise ConfigError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"_ovjax_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{p} has no get_config(arg)")
    return module


def _cast(text: str, current: Any, key: str):
    """The override string `text` as the type of the field's current value."""
    def literal():
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    if current is None:
        return None if text in ("None", "none", "null") else literal()
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected a bool (true/false), got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected an int, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected a float, got {text!r}") from None
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        v = literal()
        if isinstance(v, (tuple, list)):
            return type(current)(v)
        if text.strip() == "":
            return type(current)()
        return type(current)(s.strip() for s in text.split(","))
    raise ConfigError(f"--config.{key}: cannot override a field of type {type(current).__name__}")


def apply_override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Set `cfg.<key>` (dotted) from a string; raises ConfigError for unknown keys or bad values."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:i]) or "the top level"
            keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(f"--config.{key}: no section {part!r} at {where}; keys there: {keys}")
        node = node[part]
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"--config.{key}: unknown key {leaf!r}; keys at {'.'.join(parts[:-1]) or 'the top level'}: "
                          f"{keys}")
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key} is a section; set one of its keys: {sorted(current.keys())}")
    value = _cast(text, current, key)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--config.{key}={text!r}: {e}") from e


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(other args, [(dotted key, value)]) from `--config.a.b=v` / `--config.a.b v`."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            body = a[len("--config."):]
            if "=" in body:
                k, v = body.split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{a} needs a value")
                k, v = body, argv[i + 1]
                i += 1
            overrides.append((k, v))
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def run_defaults(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the fields this loop reads that a config may lack (an existing value is never changed)."""
    def add(section: str, **fields):
        if section not in cfg:
            cfg[section] = ml_collections.ConfigDict()
        for k, v in fields.items():
            if k not in cfg[section]:
                cfg[section][k] = v
    add("train", on_nonfinite="stop",   # stop | skip (skip: the update is dropped, the step still counts)
        peak_flops=0.0,                  # per-device peak FLOP/s for MFU; 0 = table / measured (metrics.py)
        progress="auto",                 # auto | bar | lines
        xla_compiler_options="",         # "name=value,..." for the step's jit (e.g. xla_backend_optimization_level=0)
        max_segments=0)                  # samples per packed row the loader accepts (0 = no limit)
    add("checkpoint", every=100, keep=3, async_save=True)
    add("init", from_checkpoint="", from_hf="")
    add("data", seed=0, train="", workers=0, min_pixels=3136, max_pixels=0,  # 0: the synthetic set's own
        synthetic="caption", synthetic_samples=2000, synthetic_max_turns=0,  # max_turns 0: fit seq_len
        synthetic_root="",               # where the synthetic set is made / reused ("" = DIR/data)
        tokenizer="")                    # tokenizer dir to check ids against ("" = found via the manifests)
    return cfg


def load_config(spec: str, overrides: list[tuple[str, str]] | list[str] = ()) -> ml_collections.ConfigDict:
    """`FILE.py[:ARG]` + overrides -> the run config (with `run_defaults`)."""
    path, _, arg = spec.partition(":")
    module = _load_module(path)
    cfg = module.get_config(arg) if arg else module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return a ConfigDict, got {type(cfg).__name__}")
    cfg = run_defaults(cfg)
    if overrides and isinstance(overrides[0], str):
        _, overrides = split_overrides(list(overrides))
    for k, v in overrides:
        apply_override(cfg, k, v)
    return cfg


def check_config(cfg) -> None:
    t, c = cfg.train, cfg.checkpoint
    for section, key in (("train", "steps"), ("train", "batch_size"), ("train", "seq_len"), ("train", "log_every"),
                         ("checkpoint", "every")):
        v = cfg[section][key]
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{section}.{key} must be a positive int, got {v!r}")
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite must be 'stop' or 'skip', got {t.on_nonfinite!r}")
    if c.keep is not None and c.keep < 1:
        raise ConfigError(f"checkpoint.keep must be >= 1, got {c.keep}")
    if cfg.init.from_checkpoint and cfg.init.from_hf:
        raise ConfigError("set at most one of init.from_checkpoint and init.from_hf")
    if t.batch_size % t.micro_batches:
        raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by train.micro_batches {t.micro_batches}")


# --------------------------------------------------------------------------------------------- data

SYNTHETIC_MODELS = ("tiny", "demo")  # model names that default to the synthetic dataset


def synthetic_data(cfg, root: Path, log=print) -> tuple[Path, Path]:
    """(packed dir, tokenizer dir) of the synthetic set this run's config asks for, made under `root` if
    missing; the model's vocabulary size and special-token ids are set from the tokenizer."""
    from ovjax.data import synthetic

    t, d = cfg.train, cfg.data
    max_pixels = d.max_pixels or min(synthetic.MAX_PIXELS, (t.max_patches // 2) * 196)  # ~2 images a row
    # one merged token is 28x28 px; keep whole merge cells and stay within the row's patch budget
    max_pixels = max(3136, (max_pixels // 784) * 784)
    turns = d.synthetic_max_turns or (1 if t.seq_len < 128 else 4)
    packed = synthetic.ensure_packed(root, d.synthetic, n=d.synthetic_samples, seed=d.seed, seq_len=t.seq_len,
                                     max_patches=t.max_patches, max_images=t.max_images,
                                     max_segments=t.max_segments or None, max_turns=turns, max_pixels=max_pixels,
                                     log=log)
    tok_dir = root / "tokenizer"
    use_tokenizer(cfg, tok_dir)
    d.max_pixels = max_pixels
    return packed, tok_dir


def use_tokenizer(cfg, tok_dir: Path) -> None:
    """Set the model's vocabulary size and special-token ids from a tokenizer directory."""
    from transformers import AutoTokenizer

    from ovjax.data import tokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = tokenizer.special_token_ids(tok)
    m = cfg.model
    m.text.vocab_size = len(tok)
    m.image_token_id, m.video_token_id = ids["image_pad"], ids["video_pad"]
    m.vision_start_token_id, m.vision_end_token_id = ids["vision_start"], ids["vision_end"]


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
    from transformers import AutoTokenizer

    from ovjax.data import tokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = tokenizer.special_token_ids(tok)
    m = cfg.model
    problems = []
    if len(tok) > m.text.vocab_size:
        problems.append(f"the tokenizer has {len(tok)} tokens, model.text.vocab_size is {m.text.vocab_size}")
    for field, key in (("image_token_id", "image_pad"), ("video_token_id", "video_pad"),
                       ("vision_start_token_id", "vision_start"), ("vision_end_token_id", "vision_end")):
        if m[field] != ids[key]:
            problems.append(f"model.{field}={m[field]} but the tokenizer's {key} id is {ids[key]}")
    if problems:
        raise ConfigError(f"model and data tokenizer {tok_dir} disagree: " + "; ".join(problems))


def resolve_data(cfg, workdir: Path, log=print) -> Path:
    if cfg.data.train:
        p = Path(cfg.data.train)
        if not (p / "manifest.json").exists():
            raise ConfigError(f"data.train={cfg.data.train} is not a packed directory (no manifest.json); make one "
                              "with `python -m ovjax pack`")
        tok = Path(cfg.data.tokenizer) if cfg.data.tokenizer else find_tokenizer(p)
        if tok is not None:
            check_tokenizer(cfg, tok)
        else:
            log(f"note: could not find the tokenizer of {p} (set data.tokenizer) to check the model's token ids")
        return p
    if jax_process_count() > 1:
        raise ConfigError("data.train is empty: make the synthetic set with one process first (or set data.train); "
                          "several processes would each write it")
    if cfg.model.name not in SYNTHETIC_MODELS:
        raise ConfigError(f"data.train is empty: set --config.data.train=PACKED_DIR (only the tiny preset "
                          f"has a synthetic default; this is {cfg.model.name})")
    packed, _ = synthetic_data(cfg, Path(cfg.data.synthetic_root or workdir / "data"), log)
    return packed


def jax_process_count() -> int:
    import jax

    return jax.process_count()


def make_loader(cfg, data_dir: Path, mesh):
    from ovjax.data import images, loader

    t, d = cfg.train, cfg.data
    return loader.PackedLoader(str(data_dir), seq_len=t.seq_len, max_patches=t.max_patches,
                               global_batch_size=t.batch_size, max_images=t.max_images,
                               max_segments=t.max_segments or None, mesh=mesh, micro_batches=t.micro_batches,
                               seed=d.seed, worker_count=d.workers, min_pixels=d.min_pixels,
                               max_pixels=d.max_pixels or images.MAX_PIXELS)


# --------------------------------------------------------------------------------------------- step

COUNTERS = ("samples", "images")


def compiler_options(text: str) -> dict | None:
    """ "a=1,b=x" -> {"a": 1, "b": "x"} (None when empty)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ConfigError(f"train.xla_compiler_options: {item!r} is not name=value")
        out[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
    return out or None


_COMPILED: dict[str, Any] = {}
LOOP_ONLY = ("on_nonfinite", "progress", "log_every", "peak_flops")  # jitted functions of this process, by what they depend on


def _key(kind: str, setup, *extra) -> str:
    """Everything a jitted function of `setup` depends on: the model, optimizer, train and mesh sections and
    the devices (so a second run with the same config in one process reuses the compiled program)."""
    c = setup.cfg
    sections = {k: json.loads(c[k].to_json()) for k in ("model", "optim", "train", "mesh")}
    for k in LOOP_ONLY:  # read by the loop, not by the compiled functions
        sections["train"].pop(k, None)
    devices = [d.id for d in setup.mesh.devices.flat]
    return json.dumps([kind, sections, devices, list(setup.mesh.axis_names), list(setup.mesh.devices.shape),
                       list(extra)], sort_keys=True, default=str)


def make_train_step(setup, batch_shardings, options: dict | None = None):
    """jit(state, batch, skip_nonfinite) -> (state, metrics): the step of ovjax.train.step plus global batch
    counters; when `skip_nonfinite` (a traced bool, so one program serves both modes) is true, an update
    with a non-finite loss or gradient norm is replaced by the old params and optimizer state."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from ovjax.train import step as step_lib
    from ovjax.train.state import TrainState

    def build():
        inner = step_lib.make_step_fn(setup)

        def fn(state, batch, skip_nonfinite):
            new, m = inner(state, batch)
            take = m["finite"] | jnp.logical_not(skip_nonfinite)
            # a conditional, not an elementwise select: no pass over the params when the update is taken
            params, opt_state = jax.lax.cond(take, lambda a, b: a, lambda a, b: b,
                                             (new.params, new.opt_state), (state.params, state.opt_state))
            new = TrainState(step=new.step, params=params, opt_state=opt_state)
            m = dict(m)
            m["samples"] = jnp.sum(jnp.max(batch["segment_ids"], axis=1)).astype(jnp.float32)
            m["images"] = (jnp.sum(jnp.max(batch["patch_segment"], axis=1)).astype(jnp.float32)
                           if "patch_segment" in batch else jnp.zeros((), jnp.float32))
            return new, m

        replicated = NamedSharding(setup.mesh, P())
        return jax.jit(fn, in_shardings=(setup.shardings, batch_shardings, replicated),
                       out_shardings=(setup.shardings, replicated), donate_argnums=(0,), compiler_options=options)
    key = _key("step", setup, options)
    if key not in _COMPILED:
        _COMPILED[key] = build()
    return _COMPILED[key]


def random_state(setup, seed: int):
    """Random init of the whole train state, every array made in its sharding (as state.init_state does),
    with the jitted init kept for later runs of the same config in this process."""
    import jax

    from ovjax import sharding
    from ovjax.models import vlm
    from ovjax.train import optim, state as state_lib

    key = _key("init", setup)
    if key not in _COMPILED:
        def init(rng):
            params = sharding.unbox(vlm.init_params(setup.model_cfg, rng, boxed=True))
            trainable, _ = optim.split(params, list(setup.trainable))
            return state_lib.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                                        opt_state=setup.tx.init(trainable))
        # XLA:CPU spends long optimising the random init, which runs once; skip that optimisation there
        opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
        _COMPILED[key] = jax.jit(init, out_shardings=setup.shardings, compiler_options=opts)
    return _COMPILED[key](jax.random.PRNGKey(seed))


# --------------------------------------------------------------------------------------------- start

@dataclasses.dataclass
class Start:
    state: Any
    step: int
    counters: dict
    data_state: dict | None
    source: str


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}")
    return out


def _model_section(cfg_json: dict) -> dict:
    m = dict(cfg_json["model"])
    for k in ("dtype", "param_dtype", "attention_impl", "remat"):
        m.pop(k, None)
    return m


def initial_state(cfg, setup, workdir: Path, ckpt, log=print) -> Start:
    """The state to start from (module docstring, "Start")."""
    import jax

    from ovjax import checkpoint
    from ovjax.train import state as state_lib

    zero = {"samples_seen": 0, "tokens_seen": 0, "supervised_tokens_seen": 0, "images_seen": 0,
            "skipped_updates": 0}
    latest = ckpt.latest_step()
    if latest is not None:
        target = setup.abstract_with_shardings()
        out = ckpt.restore(latest, target.params, {"step": target.step, "opt_state": target.opt_state})
        st = state_lib.TrainState(step=out["opt"]["step"], params=out["params"], opt_state=out["opt"]["opt_state"])
        if int(st.step) != latest:
            raise checkpoint.CheckpointError(f"checkpoint {latest} holds train step {int(st.step)}")
        counters = {**zero, **out["meta"].get("counters", {})}
        return Start(st, latest, counters, out["data"], f"resumed from {ckpt.directory / str(latest)}")
    if cfg.init.from_checkpoint:
        src = cfg.init.from_checkpoint
        prev = checkpoint.read_meta(src)
        if "config" in prev:
            mine, theirs = _model_section(json.loads(cfg.to_json())), _model_section(json.loads(prev["config"]))
            diff = differences(mine, theirs)
            if diff:
                raise ConfigError(f"init.from_checkpoint={src}: its model config differs in {diff}")
        params = checkpoint.load_params(src, setup.abstract_with_shardings().params)
        return Start(state_lib.state_from_params(setup, params), 0, dict(zero), None,
                     f"params of {checkpoint.checkpoint_dir(src)} (step {prev.get('step')}), fresh optimizer")
    if cfg.init.from_hf:
        from ovjax import hf

        model = hf.load(cfg.init.from_hf, remote_code_quirks=False)
        keys = ("vision", "text", "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        mine = {k: v for k, v in json.loads(cfg.to_json())["model"].items() if k in keys}
        theirs = {k: v for k, v in json.loads(ml_collections.ConfigDict(model.cfg).to_json()).items() if k in keys}
        diff = differences(mine, theirs)
        if diff:
            raise ConfigError(f"init.from_hf={cfg.init.from_hf}: its config.json describes another model than "
                              f"model.* of this run; they differ in {diff}")
        params = jax.tree_util.tree_map(lambda x: jax.device_get(x), model.params)
        return Start(state_lib.state_from_params(setup, params), 0, dict(zero), None,
                     f"imported {cfg.init.from_hf}, fresh optimizer")
    return Start(random_state(setup, int(cfg.train.seed)), 0, dict(zero), None,
                 f"random init (train.seed={cfg.train.seed})")


# ---------------------------------------------------------------------------------------------- run

def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024


def maybe_init_distributed() -> None:
    """Several processes: `jax.distributed.initialize` from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID (or the cluster auto-detection when OVJAX_DISTRIBUTED=1)."""
    import jax

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))
    elif os.environ.get("OVJAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def run(cfg, workdir: str | os.PathLike) -> dict:
    """Train one stage in `workdir`; returns a summary (last metrics, counters, seconds)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from ovjax import checkpoint, sharding
    from ovjax.train import flops as flops_lib, metrics as metrics_lib, state as state_lib
    from ovjax.train import step as step_lib

    t_start = time.perf_counter()
    check_config(cfg)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    log = print if primary else (lambda *a, **k: None)

    data_dir = resolve_data(cfg, workdir, log)
    mesh = sharding.make_mesh(cfg.mesh)
    setup = state_lib.build(cfg, mesh)
    if primary:
        (workdir / "config.json").write_text(cfg.to_json(indent=2) + "\n")
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), keep=cfg.checkpoint.keep,
                                   async_save=cfg.checkpoint.async_save)
    start = initial_state(cfg, setup, workdir, ckpt, log)

    loader = make_loader(cfg, data_dir, mesh)
    if start.data_state is not None:
        loader.set_state(start.data_state)
    structs = step_lib.batch_struct(cfg)
    batch_shardings = sharding.batch_shardings(structs, mesh, int(cfg.train.micro_batches))
    train_step = make_train_step(setup, batch_shardings, compiler_options(cfg.train.xla_compiler_options))
    skip = jax.device_put(np.bool_(cfg.train.on_nonfinite == "skip"), NamedSharding(mesh, P()))

    t = cfg.train
    towers = tuple(sorted({p.split("/")[0] for p in setup.trainable}))
    step_flops = flops_lib.step_flops(setup.model_cfg, t.batch_size, t.seq_len, t.max_patches, t.max_images,
                                      trainable=towers)["train"]
    peak, peak_src = metrics_lib.peak_flops(override=t.peak_flops)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(setup.abstract.params))
    n_train = sum(int(np.prod(x.shape)) for p, x in _flat(setup.abstract.params).items() if p in set(setup.trainable))
    log("=" * 72)
    log(f"ovjax train  workdir {workdir}")
    log(state_lib.report(setup))
    log(f"model {cfg.model.name}: {n_params:,} params, {n_train:,} trainable ({', '.join(towers)}); "
        f"compute {cfg.model.dtype}, remat {cfg.model.remat}, attention {cfg.model.attention_impl}")
    log(f"batch {t.batch_size} rows x {t.seq_len} tokens, {t.max_patches} patches/row, micro-batches "
        f"{t.micro_batches}; {step_flops / 1e9:.2f} GFLOP/step; peak {peak / 1e12:.3f} TFLOP/s/device ({peak_src})")
    log(f"data {data_dir} ({loader.num_rows} rows, seed {cfg.data.seed}, {cfg.data.workers} workers); "
        f"start: {start.source}")
    log("=" * 72)

    total = int(t.steps)
    writer = metrics_lib.MetricsWriter(workdir, total_steps=total, resume_step=start.step, enabled=primary,
                                       progress={"auto": None, "bar": True, "lines": False}[t.progress])
    counters = dict(start.counters)
    state = start.state
    step = start.step
    pending: list[tuple[int, dict]] = []
    interval = {"tokens": 0.0, "steps": 0, "t0": None}
    last: dict = {}
    n_dev = jax.device_count()

    def flush(now_step: int, log_it: bool):
        """Fetch the pending metrics; stop at the first non-finite step; log at log steps."""
        nonlocal last
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, fetched):
            finite = bool(m["finite"])
            if not finite and cfg.train.on_nonfinite == "stop":
                raise NonFiniteLoss(
                    f"non-finite loss at step {s} (loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}); "
                    f"stopping without saving. The latest checkpoint is step {ckpt.latest_step()}; set "
                    "--config.train.on_nonfinite=skip to drop such updates instead")
            counters["samples_seen"] += int(m["samples"])
            counters["tokens_seen"] += int(m["tokens"])
            counters["supervised_tokens_seen"] += int(m["supervised_tokens"])
            counters["images_seen"] += int(m["images"])
            if not finite:
                counters["skipped_updates"] += 1
                writer.note(f"step {s}: non-finite loss {float(m['loss'])}; update skipped "
                            f"({counters['skipped_updates']} so far)")
            if interval["t0"] is not None:
                interval["tokens"] += float(m["tokens"])
                interval["steps"] += 1
            last = {"step": s, **m}
        pending.clear()
        if not log_it:
            return
        now = time.perf_counter()
        dt = now - interval["t0"] if interval["t0"] is not None else math.nan
        steps = interval["steps"]
        m = last
        rec = {
            "step": now_step, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
            "tokens_per_s": interval["tokens"] / dt if steps else math.nan,
            "step_seconds": dt / steps if steps else math.nan,
            "mfu": flops_lib.mfu(step_flops, dt / steps, n_dev, peak) if steps else math.nan,
            "samples_seen": counters["samples_seen"], "tokens_seen": counters["tokens_seen"],
            "supervised_tokens": int(m["supervised_tokens"]),
            "supervised_fraction": float(m["supervised_tokens"]) / max(1.0, float(m["tokens"])),
            "supervised_tokens_seen": counters["supervised_tokens_seen"], "images_seen": counters["images_seen"],
            "epoch": round(loader.epoch, 4), "skipped_updates": counters["skipped_updates"],
        }
        rec.update({k: float(v) for k, v in m.items() if k.startswith("lr/")})
        writer.write(rec)
        interval.update(tokens=0.0, steps=0, t0=time.perf_counter())

    t_compile = None
    if step >= total:
        prev = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
        last = {"loss": prev[-1]["loss"]} if prev else {}
        log(f"step {step} of {total} is done already (checkpoint {ckpt.latest_step()}); nothing to train")
    try:
        while step < total:
            batch = next(loader)
            batch = {k: (v if v.sharding == batch_shardings[k] else jax.device_put(v, batch_shardings[k]))
                     for k, v in batch.items() if k in batch_shardings}
            state, m = train_step(state, batch, skip)
            step += 1
            pending.append((step, m))
            if t_compile is None:
                jax.block_until_ready(m)
                t_compile = time.perf_counter() - t_start
                writer.note(f"first step done {t_compile:.1f} s after start (compile included)")
                flush(step, step % t.log_every == 0 or step == total)
                interval["t0"] = time.perf_counter()
                if step % cfg.checkpoint.every and step != total:
                    continue
            is_log = step % t.log_every == 0 or step == total
            is_save = step % cfg.checkpoint.every == 0 or step == total
            if is_log or is_save:
                if pending:
                    flush(step, is_log)
            if is_save:
                ckpt.save(step, state, loader.get_state(),
                          {"step": step, "counters": dict(counters), "config": cfg.to_json()})
        ckpt.wait()
    finally:
        loader.close()
        ckpt.close()
        writer.close()
    seconds = time.perf_counter() - t_start
    summary = {"step": step, "loss": float(last.get("loss", math.nan)) if last else math.nan,
               "seconds": seconds, "first_step_seconds": t_compile, **counters}
    log(f"done: step {step}, loss {summary['loss']:.4f}, {seconds:.1f} s; checkpoints in {ckpt.directory}")
    return summary


def _flat(tree) -> dict[str, Any]:
    from ovjax.train import optim

    return optim.flat(tree)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_overrides(argv)
        parser = argparse.ArgumentParser(prog="python -m ovjax train", description=__doc__.split("\n\n")[0],
                                         epilog="Overrides: --config.a.b=value (see the module docstring).")
        parser.add_argument("--config", required=True, help="FILE.py:ARG, e.g. configs/stage1.py:tiny")
        parser.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, tb)")
        args = parser.parse_args(rest)
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"train: config error: {e}", file=sys.stderr)
        return 2
    maybe_init_distributed()
    try:
        run(cfg, args.workdir)
    except NonFiniteLoss as e:
        print(f"train: {e}", file=sys.stderr)
        return 3
    except ConfigError as e:
        print(f"train: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
