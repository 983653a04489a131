"""Streamed export: our param tree -> hub tensors, written one tensor at a time (files.write_checkpoint).

Each stored tensor is produced from one layer slice of one param leaf (`np.asarray(leaf[n])` fetches only that
slice from the devices), converted to the export dtype, written, and dropped: peak host memory is about one
tensor beyond the params themselves.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterator

import jax
import numpy as np

from ovjax.hf import config as hf_config
from ovjax.hf import files
from ovjax.hf.files import CheckpointError
from ovjax.hf.keymap import KeyMap, key_map
from ovjax.hf.reader import get_path as _leaf


def tensor_specs(kmap: KeyMap, params, dtype) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{stored key: (shape, dtype)} from the params' shapes alone (nothing computed)."""
    specs = {}
    for entry in kmap.entries:
        leaf = _leaf(params, entry.path)
        one = tuple(leaf.shape[1:]) if entry.stack else tuple(leaf.shape)
        out = jax.eval_shape(entry.to_hf, jax.ShapeDtypeStruct(one, np.float32))
        for keys in kmap.stored_keys(entry):
            for key, o in zip(keys, out):
                specs[key] = (tuple(o.shape), np.dtype(dtype))
    return specs


def iter_tensors(kmap: KeyMap, params, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(stored key, numpy tensor in `dtype`) in sorted key order, one layer slice fetched at a time."""
    where = {}
    for entry in kmap.entries:
        for n, keys in zip(kmap.layer_range(entry), kmap.stored_keys(entry)):
            for i, key in enumerate(keys):
                where[key] = (entry, n, i)
    for key in sorted(where):
        entry, n, i = where[key]
        leaf = _leaf(params, entry.path)
        value = np.asarray(jax.device_get(leaf[n] if entry.stack else leaf))
        yield key, np.ascontiguousarray(entry.to_hf(value)[i]).astype(dtype, copy=False)


def export_tensors(cfg, params, dtype=None) -> dict[str, np.ndarray]:
    """Our param pytree -> {hub key: numpy tensor} (all in memory; for small models and tests)."""
    kmap = key_map(cfg)
    dt = np.dtype(dtype) if dtype is not None else _params_dtype(kmap, params)
    return dict(iter_tensors(kmap, params, dt))


def _params_dtype(kmap: KeyMap, params) -> np.dtype:
    return np.dtype(_leaf(params, kmap.entries[0].path).dtype)


def write_hf(cfg, params, path: str, *, dtype=None, max_shard_bytes: int = files.DEFAULT_SHARD_BYTES,
             verify: str = "shapes") -> dict:
    """config.json + safetensors for (cfg, params) in `path`. dtype: stored dtype (default: the params').
    verify: "shapes" (reopen, compare keys/shapes/dtypes) or "values" (also compare every tensor's bytes
    with a fresh conversion of the params). Returns the config.json written."""
    os.makedirs(path, exist_ok=True)
    kmap = key_map(cfg)
    dt = np.dtype(dtype) if dtype is not None else _params_dtype(kmap, params)
    hub = hf_config.config_to_hf(cfg, params, dtype_name=hf_config.dtype_name(dt))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hub, f, indent=2, sort_keys=True)
        f.write("\n")
    specs = tensor_specs(kmap, params, dt)
    files.write_checkpoint(path, specs, iter_tensors(kmap, params, dt), max_shard_bytes=max_shard_bytes)
    files.verify_written(path, specs)
    if verify == "values":
        with files.TensorSource(path) as src:
            for key, value in iter_tensors(kmap, params, dt):
                if src.get(key).tobytes() != value.tobytes():
                    raise CheckpointError(f"export check failed: {key} differs after reloading {path}")
    return hub


def copy_files(source: str | None, path: str, names) -> list[str]:
    """Copy the named side files (tokenizer, processor, ...) that exist in `source` into `path`."""
    copied = []
    os.makedirs(path, exist_ok=True)
    if source and os.path.abspath(source) != os.path.abspath(path):
        for name in names:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(path, name))
                copied.append(name)
    return copied
