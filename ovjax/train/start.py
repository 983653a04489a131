"""Where a run starts: the latest complete checkpoint in its workdir (exact resume: train state, data
iterator state and counters); else `init.from_checkpoint` (a previous stage's workdir: params only, fresh
optimizer); else `init.from_hf` (a hub-layout directory); else random init with `train.seed`. A source whose
model config differs from the run's is refused, naming the fields that differ. A LoRA run (model.lora.rank
> 0) may start from a source without adapters: the base is read, the adapters start fresh.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections

from ovjax.config import ConfigError
from ovjax.models import lora

COUNTERS = ("samples_seen", "tokens_seen", "supervised_tokens_seen", "images_seen", "skipped_updates")


@dataclasses.dataclass
class Start:
    state: Any               # TrainState in the run's shardings
    step: int                # steps already done
    counters: dict           # COUNTERS -> int
    data_state: dict | None  # the data iterator's state to restore (None: from the beginning)
    source: str              # one line for the startup report


def initial_state(cfg, setup, train_step, ckpt, log=print) -> Start:
    """The state to start from (module docstring); `train_step` (step.TrainStep) makes a random one."""
    import jax

    from ovjax import checkpoint
    from ovjax.train import state as state_lib

    zero = dict.fromkeys(COUNTERS, 0)
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
        theirs_lora = json.loads(prev["config"])["model"].get("lora") if "config" in prev else None
        mine_lora = json.loads(cfg.to_json())["model"].get("lora")
        target = setup.abstract_with_shardings().params
        if _adapters_differ(mine_lora, theirs_lora):
            if theirs_lora and theirs_lora.get("rank"):
                raise ConfigError(f"init.from_checkpoint={src}: its LoRA adapters (model.lora {theirs_lora}) "
                                  f"differ from this run's ({mine_lora}); export it merged and start from that")
            params, note = with_fresh_adapters(setup, lambda base: checkpoint.load_params(src, base)), ", fresh adapters"
        else:
            params, note = checkpoint.load_params(src, target), ""
        return Start(state_lib.state_from_params(setup, params), 0, dict(zero), None,
                     f"params of {checkpoint.checkpoint_dir(src)} (step {prev.get('step')}), fresh optimizer{note}")
    if cfg.init.from_hf:
        import os

        from ovjax import hf
        from ovjax.hf.files import read_json

        src = cfg.init.from_hf
        theirs_cfg = hf.config_from_hf(read_json(os.path.join(src, "config.json")),
                                       where=os.path.join(src, "config.json"))
        keys = ("vision", "text", "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        mine = {k: v for k, v in json.loads(cfg.to_json())["model"].items() if k in keys}
        if theirs_cfg.vision is not None:  # as hf.load(..., remote_code_quirks=False) sets it
            theirs_cfg.vision.remote_code_cls_shift = False
        theirs = {k: v for k, v in json.loads(ml_collections.ConfigDict(theirs_cfg).to_json()).items() if k in keys}
        diff = differences(mine, theirs)
        if diff:
            raise ConfigError(f"init.from_hf={src}: its config.json describes another model than "
                              f"model.* of this run; they differ in {diff}")
        # each tensor is read straight into the run's param shardings (never whole on one device)
        def read(base_target):
            return hf.load(src, str(cfg.model.param_dtype), remote_code_quirks=False, shardings=base_target).params
        params = with_fresh_adapters(setup, read)
        note = ", fresh adapters" if lora.enabled(cfg.model) else ""
        return Start(state_lib.state_from_params(setup, params), 0, dict(zero), None,
                     f"imported {src}, fresh optimizer{note}")
    return Start(train_step.init(int(cfg.train.seed)), 0, dict(zero), None,
                 f"random init (train.seed={cfg.train.seed})")


def _adapters_differ(mine: dict | None, theirs: dict | None) -> bool:
    rank = (mine or {}).get("rank", 0)
    return bool(rank or (theirs or {}).get("rank", 0)) and (mine or {}) != (theirs or {})


def with_fresh_adapters(setup, read_base):
    """The run's params from a source without LoRA adapters: `read_base(base target)` reads the base (a tree
    of ShapeDtypeStruct with shardings, adapters left out); the adapters are made fresh (B = 0, so the model
    starts exactly at the base), in their shardings, from `train.seed`. Without adapters: read_base(all)."""
    import jax

    from ovjax.models import vlm
    from ovjax.train import optim

    target = setup.abstract_with_shardings().params
    adapter_paths = [p for p in optim.flat(target) if lora.is_adapter(p)]
    if not adapter_paths:
        return read_base(target)
    adapter_target, base_target = optim.split(target, adapter_paths)
    base = read_base(base_target)
    shards = jax.tree_util.tree_map(lambda a: a.sharding, adapter_target)

    def fresh(key):  # only the adapters leave the jit: the rest of the random init is dead code
        return optim.split(vlm.init_params(setup.model_cfg, key), adapter_paths)[0]
    adapters = jax.jit(fresh, out_shardings=shards)(jax.random.PRNGKey(int(setup.cfg.train.seed)))
    return optim.merge(adapters, base)


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
    """The model fields a checkpoint's params depend on (numerics and memory knobs left out)."""
    m = dict(cfg_json["model"])
    for k in ("dtype", "param_dtype", "attention_impl", "remat", "lora"):  # lora: handled apart
        m.pop(k, None)
    return m
