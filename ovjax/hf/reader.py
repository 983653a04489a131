"""Streamed import: stored tensors -> our param tree, one param leaf at a time, straight into its sharding.

For each leaf the stored tensor(s) of each layer are read one at a time, transformed, and written into one host
buffer of the leaf's shape; the leaf is then placed with `jax.make_array_from_callback`, so each device
receives only its slice of it, and the buffer is freed before the next leaf. Peak host memory beyond what the
devices hold: one leaf + one stored tensor and its transform. The whole model is never on one device, and
never on the host twice.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from ovjax.hf.files import CheckpointError, TensorSource
from ovjax.hf.keymap import Entry, KeyMap


def _node(tree, path):
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            return None
        tree = tree[p]
    return tree


def _set(tree: dict, path, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def check_keys(source: TensorSource, kmap: KeyMap, *, extra_ok: tuple[str, ...] = (), why: str = "") -> dict[str, str]:
    """-> {canonical key: stored key}. Refuses missing tensors and stored tensors that nothing reads."""
    stored: dict[str, str] = {}
    for key in source.keys():
        canon = kmap.canonical_key(key)
        if canon in stored:
            raise CheckpointError(f"{source.path} stores {canon} twice ({stored[canon]} and {key})")
        stored[canon] = key
    expected = kmap.all_keys()
    missing = sorted(expected - stored.keys())
    if missing:
        raise CheckpointError(f"{len(missing)} tensors missing from {source.path}, e.g. {missing[:5]}")
    unexpected = sorted(k for k in set(stored) - expected if not kmap.is_ignored(k) and k not in extra_ok)
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected tensors in {source.path} (wrong config?), "
                              f"e.g. {unexpected[:5]}")
    for k in extra_ok:
        if k in stored:
            warnings.warn(f"{source.path}: {k} is not used ({why})", stacklevel=3)
    return stored


def _read_leaf(source: TensorSource, stored: dict, kmap: KeyMap, entry: Entry, shape, dtype) -> np.ndarray:
    buffer = np.empty(shape, dtype)
    for n, keys in zip(kmap.layer_range(entry), kmap.stored_keys(entry)):
        arrays = [source.get(stored[k]) for k in keys]
        want = shape[1:] if entry.stack else shape
        try:
            value = entry.to_ours(*arrays)
            ok = tuple(value.shape) == tuple(want)
        except ValueError:
            ok = False
        if not ok:
            got = ", ".join(str(tuple(a.shape)) for a in arrays)
            raise CheckpointError(f"{source.path}: {stored[keys[0]]} has shape {got}, which does not fit the config "
                                  f"({'/'.join(entry.path)} is {tuple(want)} per layer)" if entry.stack else
                                  f"{source.path}: {stored[keys[0]]} has shape {got}, which does not fit the config "
                                  f"({'/'.join(entry.path)} is {tuple(want)})")
        if entry.stack:
            buffer[n] = value
        else:
            buffer[...] = value
        del arrays, value
    return buffer


def read_params(source: TensorSource, kmap: KeyMap, target, *, stored: dict[str, str], dtype=None,
                shardings=None) -> dict:
    """Read every entry of `kmap` into a param tree shaped like `target` (a tree of ShapeDtypeStruct; only the
    entries' paths are read). dtype: numpy dtype of the result (default: the target's). shardings: a tree of
    `jax.sharding.Sharding` over the same paths (or ShapeDtypeStructs carrying one), or None for the default
    device."""
    out: dict = {}
    for entry in kmap.entries:
        leaf = _node(target, entry.path)
        if leaf is None:
            raise CheckpointError(f"the model has no parameter {'/'.join(entry.path)} (key map and model disagree)")
        shape = tuple(leaf.shape)
        host = _read_leaf(source, stored, kmap, entry, shape, np.dtype(dtype or leaf.dtype))
        _set(out, entry.path, place(host, _node(shardings, entry.path) if shardings is not None else None))
        del host
    return out


def place(host: np.ndarray, sharding=None) -> jax.Array:
    """A host array -> a jax.Array laid out by `sharding` (each device gets only its slice), or on the default
    device when sharding is None."""
    sharding = getattr(sharding, "sharding", sharding)
    if sharding is None:
        return jnp.asarray(host)
    # A copy per slice: on CPU a device buffer may alias the numpy memory it was made from, which would keep
    # the whole host buffer alive behind every shard.
    return jax.make_array_from_callback(host.shape, sharding, lambda index: np.array(host[index], copy=True))
