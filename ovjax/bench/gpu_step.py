"""Train-step timing on whatever device is present (the GPU check's train step): the 4b preset with ALL its
layers (36 LLM + 24 ViT, full 151,936-token vocabulary), a SHORT sequence (packed rows of 4096 tokens, 4096
patches), everything trainable, bf16 compute, attention `auto` (the Pallas kernel on a GPU), remat
`save_attention`. Full depth keeps the LM head at its real share of the step (~9% of the forward FLOPs instead of
~45% for 4 layers); the 8b does not fit one GPU with its f32 AdamW state (~140 GB), the 4b (~75 GB) does on
an H200/141 GB card and reports an out-of-memory error on smaller ones.

    python -m ovjax.bench.gpu_step [--smoke] [--json PATH]    # or through `bash launch/gpu_check.sh`
    python -m ovjax.bench.gpu_step --optim offload=opt_state  # the same step, moments in host memory

launch/gpu_check.sh runs it in its own process, so `peak_bytes_in_use` is this step's peak and not that of
the attention benchmarks before it.

`run(smoke, deadline) -> dict` (JSON-able; `main` writes it with --json) and `markdown(result)` are the
API. Smoke (or a CPU): the tiny preset at seq 256, XLA attention, two timed steps.

Nothing here imports grain, array_record or ml_collections at module level. The model code needs
`ml_collections` (configs are ConfigDicts); the lent GPU machines lack it, so when it is missing a minimal
stand-in (`_MiniConfigDict`: attribute access, update, get, frozen + hashable copy) is installed under that
name for this process only. `ovjax.configs` is mapped to ROOT/configs when ovjax is not pip-installed.
"""

from __future__ import annotations

import importlib
import json
import math
import pathlib
import sys
import time
import types

ROOT = pathlib.Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------ environment shims

class _MiniConfigDict:
    """The subset of ml_collections.ConfigDict the model and train code use: nested sections as attributes,
    item access, get/keys/items/update, to_json. Not a dict subclass (Flax would freeze it into a FrozenDict)."""

    _frozen = False

    def __init__(self, d=None, **kw):
        object.__setattr__(self, "_fields", {})
        for k, v in dict(d or {}, **kw).items():
            self._set(k, v)

    def _set(self, k, v):
        if isinstance(v, (dict, _MiniConfigDict)):
            v = type(self)(v.to_dict() if isinstance(v, _MiniConfigDict) else v)
        elif self._frozen and isinstance(v, list):
            v = tuple(v)
        self._fields[k] = v

    def __setitem__(self, k, v):
        if self._frozen:
            raise TypeError("FrozenConfigDict is immutable")
        self._set(k, v)

    __setattr__ = __setitem__

    def __getitem__(self, k):
        return self._fields[k]

    def __getattr__(self, k):
        try:
            return self._fields[k]
        except KeyError:
            raise AttributeError(k) from None

    def __contains__(self, k):
        return k in self._fields

    def __iter__(self):
        return iter(self._fields)

    def get(self, k, default=None):
        return self._fields.get(k, default)

    def keys(self):
        return self._fields.keys()

    def items(self):
        return self._fields.items()

    def update(self, d=None, **kw):
        for k, v in dict(d or {}, **kw).items():
            self[k] = v

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, _MiniConfigDict) else v for k, v in self._fields.items()}

    def to_json(self, **kw):
        return json.dumps(self.to_dict(), **kw)

    def __eq__(self, other):
        return isinstance(other, _MiniConfigDict) and self.to_dict() == other.to_dict()

    def __hash__(self):
        if not self._frozen:
            raise TypeError("ConfigDict is not hashable")
        return hash(tuple(sorted((k, v) for k, v in self._fields.items())))


class _MiniFrozen(_MiniConfigDict):
    _frozen = True


def ensure_environment() -> None:
    """ml_collections (real or stand-in) and `ovjax.configs` importable."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import ml_collections  # noqa: F401
    except ModuleNotFoundError:
        shim = types.ModuleType("ml_collections")
        shim.ConfigDict, shim.FrozenConfigDict = _MiniConfigDict, _MiniFrozen
        sys.modules["ml_collections"] = shim
    from ovjax.source_tree import map_folder

    map_folder("configs")
    map_folder("kernels")


# ------------------------------------------------------------------------------------- the step

def run_config(smoke: bool):
    from ovjax.train.config import base_config

    if smoke:
        cfg = base_config("tiny")
        cfg.train.update(dict(batch_size=1, seq_len=256, max_patches=256, max_images=8, loss_chunk=128))
        return cfg
    cfg = base_config("4b")  # bf16 compute, attention_impl auto (model_config); all 36 + 24 layers
    cfg.model.remat = "save_attention"
    cfg.train.update(dict(batch_size=1, micro_batches=1, seq_len=4096, max_patches=4096, max_images=8,
                          loss_chunk=1024, steps=1000))
    cfg.optim.update(dict(trainable=("visual", "merger", "language_model"),
                          frozen=("visual/class_embedding", "visual/class_pos_emb")))
    return cfg


def run(smoke: bool = False, deadline: float = math.inf, optim: dict | None = None) -> dict:
    """optim: `optim` section overrides, e.g. {"offload": "opt_state", "mu_dtype": "bfloat16"} (issue 13: run
    with and without them on a GPU and compare `peak_bytes_in_use`)."""
    ensure_environment()
    import jax

    from ovjax import sharding
    from ovjax.train import flops as flops_lib, state as state_lib, step as step_lib
    from ovjax.train.metrics import peak_flops
    from ovjax.train.synthetic_batch import synthetic_batch

    smoke = smoke or jax.default_backend() == "cpu"
    cfg = run_config(smoke)
    cfg.optim.update(dict(optim or {}))
    if smoke:
        cfg.model.attention_impl = "xla"
    t = cfg.train
    devices = jax.devices()[:1]
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    out = {"device": str(devices[0]), "device_kind": devices[0].device_kind, "preset": cfg.model.name,
           "llm_layers": cfg.model.text.num_layers, "vit_layers": cfg.model.vision.depth, "seq_len": t.seq_len,
           "max_patches": t.max_patches, "dtype": cfg.model.dtype, "remat": cfg.model.remat,
           "attention_impl": cfg.model.attention_impl, "optim_overrides": dict(optim or {})}
    t0 = time.perf_counter()
    setup = state_lib.build(cfg, mesh)
    state = state_lib.init_state(setup, jax.random.PRNGKey(0))
    ts = step_lib.TrainStep(setup)
    grids = ((1, 16, 16), (1, 32, 32), (1, 16, 32), (1, 32, 16)) if not smoke else ((1, 4, 4), (1, 8, 8))
    host = synthetic_batch(setup.model_cfg, t.batch_size, t.seq_len, t.max_patches, t.max_images, seed=0,
                           samples_per_row=8 if not smoke else 3, grids=grids)
    batch = step_lib.put_batch(host, ts)
    state, m = ts(state, batch)
    jax.block_until_ready(m)
    out["compile_and_first_step_s"] = time.perf_counter() - t0
    times = []
    for _ in range(2 if smoke else 10):
        if time.time() > deadline and times:
            break
        t1 = time.perf_counter()
        state, m = ts(state, batch)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t1)
    step_s = sorted(times)[len(times) // 2]
    f = step_flops(flops_lib, setup.model_cfg, t, host)
    peak, src = peak_flops(devices[0])
    tokens = float((host["segment_ids"] > 0).sum())
    out.update(step_s=step_s, timed_steps=len(times), loss=float(m["loss"]), tokens=tokens,
               tokens_per_s=tokens / step_s, train_flops=f["train"], hardware_flops=f["hardware"],
               peak_flops=peak, peak_source=src, mfu=f["train"] / step_s / peak,
               hfu=f["hardware"] / step_s / peak)
    stats = getattr(devices[0], "memory_stats", lambda: None)()
    if stats:
        out["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    return out


def step_flops(flops_lib, model_cfg, t, host) -> dict:
    return flops_lib.step_flops(model_cfg, t.batch_size, t.seq_len, t.max_patches, t.max_images,
                                segment_ids=host["segment_ids"], patch_segment=host["patch_segment"],
                                remat=model_cfg.get("remat", "none"))


def markdown(result: dict) -> str:
    if "error" in result or "step_s" not in result:
        return f"train step: {result}"
    gib = (result.get("peak_bytes_in_use") or 0) / 2 ** 30
    return "\n".join([
        "| model | device | seq | dtype / remat / attention | s/step | tokens/s | MFU | HFU | peak memory |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {result['preset']} ({result['llm_layers']} LLM + {result['vit_layers']} ViT layers) | "
        f"{result['device_kind']} | {result['seq_len']} packed | {result['dtype']} / {result['remat']} / "
        f"{result['attention_impl']} | {result['step_s']:.3f} | {result['tokens_per_s']:.0f} | "
        f"{result['mfu']:.1%} | {result['hfu']:.1%} | {gib:.1f} GiB |"])


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m ovjax.bench.gpu_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", default=None, help="write the result here (also on failure: its error)")
    p.add_argument("--optim", action="append", default=[], metavar="KEY=VALUE",
                   help="optim override, repeatable: offload=opt_state, mu_dtype=bfloat16")
    args = p.parse_args(argv)
    optim = {}
    for item in args.optim:
        key, sep, value = item.partition("=")
        if not sep or key not in ("offload", "mu_dtype"):
            p.error(f"--optim {item!r}: expected offload=... or mu_dtype=...")
        optim[key] = value
    try:
        res = run(smoke=args.smoke, optim=optim)
    except Exception as e:  # the caller (gpu_check) reads the error from the JSON
        res = {"error": f"{type(e).__name__}: {e}"[:2000]}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, indent=1, default=str))
    print(markdown(res))
    return 1 if "error" in res else 0


if __name__ == "__main__":
    sys.exit(main())
