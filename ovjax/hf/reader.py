"""Streamed import: stored tensors -> our param tree, one stored tensor at a time, straight into its sharding.

A stored tensor is read, transformed to our layout (the stored copy is dropped as soon as the transform made
its own), and placed with `jax.make_array_from_callback`, so each device receives only its slice. Stacked
leaves (one stored tensor per layer) are assembled on the devices: the sharded leaf starts as zeros and each
layer is written into it by a jitted, donating `dynamic_update_index_in_dim`, so no whole stacked leaf is
ever built on the host. Peak host memory beyond what the devices hold: about two stored tensors (the stored
one and its transform, or the transform and its device slices). The whole model is never on one device and
never on the host.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ovjax.hf.files import CheckpointError, TensorSource
from ovjax.hf.keymap import Entry, KeyMap


def get_path(tree, path):
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            return None
        tree = tree[p]
    return tree


def set_path(tree: dict, path, value) -> None:
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


def _stored_to_ours(source: TensorSource, stored: dict, entry: Entry, keys, want) -> np.ndarray:
    arrays = [source.get(stored[k]) for k in keys]
    shapes = ", ".join(str(tuple(a.shape)) for a in arrays)
    try:
        value = entry.to_ours(*arrays)
        ok = tuple(value.shape) == tuple(want)
    except ValueError:
        ok = False
    del arrays  # the transform made its own copy (or is the stored array itself)
    if not ok:
        per = " per layer" if entry.stack else ""
        raise CheckpointError(f"{source.path}: {stored[keys[0]]} has shape {shapes}, which does not fit the config "
                              f"({'/'.join(entry.path)} is {tuple(want)}{per})")
    return value


def _layer_sharding(sharding):
    """The sharding of one layer slice of a stacked leaf (the leading axis dropped)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


@functools.lru_cache(maxsize=None)
def _stacker(shape, dtype, sharding):
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    put = jax.jit(lambda leaf, layer, n: jax.lax.dynamic_update_index_in_dim(leaf, layer, n, 0),
                  donate_argnums=0, out_shardings=sharding)
    return zeros, put


def _read_leaf(source: TensorSource, stored: dict, kmap: KeyMap, entry: Entry, shape, dtype, sharding):
    if not entry.stack:
        value = _stored_to_ours(source, stored, entry, entry.hf, shape).astype(dtype, copy=False)
        return place(value, sharding)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    zeros, put = _stacker(tuple(shape), np.dtype(dtype), sharding)
    leaf, layer_sharding = zeros(), _layer_sharding(sharding)
    for n, keys in zip(kmap.layer_range(entry), kmap.stored_keys(entry)):
        value = _stored_to_ours(source, stored, entry, keys, shape[1:]).astype(dtype, copy=False)
        leaf = put(leaf, place(value, layer_sharding), np.int32(n))
        del value
    return leaf


def read_params(source: TensorSource, kmap: KeyMap, target, *, stored: dict[str, str], dtype=None,
                shardings=None) -> dict:
    """Read every entry of `kmap` into a param tree shaped like `target` (a tree of ShapeDtypeStruct; only the
    entries' paths are read). dtype: numpy dtype of the result (default: the target's). shardings: a tree of
    `jax.sharding.Sharding` over the same paths (or ShapeDtypeStructs carrying one), or None for the default
    device."""
    out: dict = {}
    for entry in kmap.entries:
        leaf = get_path(target, entry.path)
        if leaf is None:
            raise CheckpointError(f"the model has no parameter {'/'.join(entry.path)} (key map and model disagree)")
        sharding = get_path(shardings, entry.path) if shardings is not None else None
        sharding = getattr(sharding, "sharding", sharding)
        set_path(out, entry.path, _read_leaf(source, stored, kmap, entry, tuple(leaf.shape),
                                         np.dtype(dtype or leaf.dtype), sharding))
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
