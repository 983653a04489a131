"""The only module that knows mesh axes: mesh construction, the logical-axis rule table, sharded init,
shardings for params / optimizer state / batch, and the activation-constraint context.

Mesh axes (in this order): `data` (pure data parallel; across nodes on several hosts), `fsdp` (data
parallel with parameters, gradients and optimizer state sharded, ZeRO-3 style), `tensor` (Megatron-style
heads / mlp / vocab split) and `sequence` (the LLM's token axis is split; weights are also sharded over it
FSDP-style because they are all-gathered per layer anyway).

Logical names are resolved by `RULES`, one ordered table: for each dimension the first rule whose mesh axes
are still unused by the array's other dimensions and whose size product divides the dimension wins (for
parameters; activation constraints may be uneven, GSPMD pads them). Later rows for the same name are the
fallbacks. A dimension with no usable rule stays unsharded; `layout_report` says which and how many bytes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ovjax.data import batch as batch_contract

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")
WEIGHT_AXES = ("fsdp", "sequence")  # the axes parameters are FSDP-sharded over

# One ordered table, params and activations, ViT and LLM alike: (logical name, mesh axes or None).
RULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    # --- parameters: model-parallel dims first, so `tensor` goes to heads / mlp / vocab
    ("vocab", ("tensor",)),
    ("q_heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ("tensor",)),          # fallback: GQA with fewer kv heads than `tensor`
    ("mlp", ("tensor",)),
    ("vit_heads", ("tensor",)),
    ("vit_head_dim", ("tensor",)),      # fallback: heads not divisible by `tensor`
    ("vit_mlp", ("tensor",)),
    ("merger_mlp", ("tensor",)),
    ("vit_patch", ("tensor",)),         # patch_embed has no other model-parallel dim
    # FSDP over the hidden (embedding) dims, with fallbacks to one axis at a time
    ("embed", WEIGHT_AXES), ("embed", ("fsdp",)), ("embed", ("sequence",)),
    ("vit_embed", WEIGHT_AXES), ("vit_embed", ("fsdp",)), ("vit_embed", ("sequence",)),
    ("merger_in", WEIGHT_AXES), ("merger_in", ("fsdp",)), ("merger_in", ("sequence",)),
    # fallbacks when the hidden dim cannot take the FSDP axes (odd tiny dims)
    ("mlp", WEIGHT_AXES), ("mlp", ("fsdp",)),
    ("vit_mlp", WEIGHT_AXES), ("vit_mlp", ("fsdp",)),
    ("merger_mlp", WEIGHT_AXES), ("merger_mlp", ("fsdp",)),
    ("vocab", WEIGHT_AXES), ("vocab", ("fsdp",)),
    ("layers", None), ("qkv", None), ("lora_rank", None),
    # --- activations (block edges; see ovjax/models/layers.py)
    ("act_batch", BATCH_AXES),
    ("act_seq", ("sequence",)),
    ("act_embed", None),
    ("act_heads", ("tensor",)),
    ("act_kv_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
    ("act_patches", None),
    ("act_vit_embed", None),
)


class ShardingError(ValueError):
    """A mesh that does not fit the devices, or an array dimension that does not divide its mesh axes."""


# ----------------------------------------------------------------------------- mesh

def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int, int]:
    """(data, fsdp, tensor, sequence) from a config with those fields; one of them may be -1 (fills)."""
    sizes = []
    for name in MESH_AXES:
        v = mesh_cfg[name] if not isinstance(mesh_cfg, dict) else mesh_cfg.get(name, 1)
        if not isinstance(v, (int, np.integer)) or (v < 1 and v != -1):
            raise ShardingError(f"mesh.{name} must be a positive int or -1, got {v!r}")
        sizes.append(int(v))
    fill = [n for n, v in zip(MESH_AXES, sizes) if v == -1]
    if len(fill) > 1:
        raise ShardingError(f"only one mesh axis may be -1, got {fill}")
    known = math.prod(v for v in sizes if v != -1)
    desc = " x ".join(f"{n}={v}" for n, v in zip(MESH_AXES, sizes))
    if fill:
        if num_devices % known:
            raise ShardingError(f"mesh {desc}: {num_devices} devices are not divisible by {known}, "
                                f"so {fill[0]}=-1 cannot fill the rest")
        sizes[MESH_AXES.index(fill[0])] = num_devices // known
    elif known != num_devices:
        raise ShardingError(f"mesh {desc} has {known} devices but there are {num_devices}")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[Any] | None = None, hosts: Sequence[str] | None = None) -> Mesh:
    """A Mesh over (data, fsdp, tensor, sequence) with Auto axis types (GSPMD logical constraints).

    On several hosts the mesh is hybrid: `data` spans the hosts (and, with `mesh.fsdp_across_hosts`, an outer
    part of `fsdp` when data alone cannot cover them), the rest stays inside a host (NVLink), so the per-layer
    all-gathers and the tensor/sequence collectives never leave a node. `hosts`: host name of each process
    (by index); default `ovjax.distributed.process_hosts()`, else every process its own host.
    """
    from ovjax import distributed

    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    hosts = hosts or distributed.process_hosts()
    procs = sorted({d.process_index for d in devices})
    host_of = {p: (hosts[p] if hosts else f"process {p}") for p in procs}
    groups: dict[str, list] = {}
    for d in devices:
        groups.setdefault(host_of[d.process_index], []).append(d)
    if len(groups) == 1:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    per_host = {len(g) for g in groups.values()}
    if len(per_host) != 1:
        raise ShardingError(f"hosts have different device counts { {h: len(g) for h, g in groups.items()} }")
    outer_fsdp = bool(_field(mesh_cfg, "fsdp_across_hosts", False))
    dcn, ici = hybrid_shape(shape, len(groups), per_host.pop(), outer_fsdp,
                            unit="process" if len(groups) == len(procs) else "host")
    if len(groups) == len(procs):  # one process per host: jax's hybrid mesh, a process is a granule
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True,
                                                    allow_split_physical_axes=True)
    else:  # several processes (e.g. one per GPU) per host: the host is the granule
        blocks = np.empty(dcn, dtype=object)
        for idx, g in zip(np.ndindex(*dcn), groups.values()):
            blocks[idx] = mesh_utils.create_device_mesh(ici, g, allow_split_physical_axes=True)
        grid = np.block(blocks.tolist())
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _field(mesh_cfg, name: str, default):
    if isinstance(mesh_cfg, dict):
        return mesh_cfg.get(name, default)
    return mesh_cfg[name] if name in mesh_cfg else default


def hybrid_shape(shape: Sequence[int], n_hosts: int, per_host: int, outer_fsdp: bool = False,
                 unit: str = "host") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(across-host shape, inside-host shape) of a (data, fsdp, tensor, sequence) mesh on `n_hosts` hosts of
    `per_host` devices: `data` goes across hosts first; with `outer_fsdp` the hosts data cannot cover take an
    outer part of `fsdp`. tensor and sequence never cross a host. Raises ShardingError naming the axis."""
    data, fsdp, tensor, sequence = shape
    units = unit + ("es" if unit.endswith("s") else "s")
    if math.prod(shape) != n_hosts * per_host:
        raise ShardingError(f"mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices but there are "
                            f"{n_hosts} {units} x {per_host} devices = {n_hosts * per_host}")
    for name, size in (("tensor", tensor), ("sequence", sequence), ("tensor x sequence", tensor * sequence)):
        if per_host % size:
            raise ShardingError(f"mesh.{name}={size} would span hosts: a {unit} has {per_host} devices, and "
                                f"tensor/sequence must stay inside one (put data or fsdp across the {n_hosts} "
                                f"{units})")
    if not outer_fsdp:
        if data % n_hosts:
            raise ShardingError(f"{n_hosts} {units} need mesh.data ({data}) divisible by the {unit} count, so "
                                f"that data spans the nodes and fsdp/tensor/sequence stay inside one (or set "
                                f"mesh.fsdp_across_hosts=true)")
        dcn = (n_hosts, 1, 1, 1)
    else:
        # data takes gcd(data, hosts) of the hosts; the rest divides fsdp, since data x fsdp = hosts x k once
        # tensor x sequence divides a host (checked above) and hosts/gcd is coprime with data/gcd
        d = math.gcd(data, n_hosts)
        dcn = (d, n_hosts // d, 1, 1)
    return dcn, tuple(s // c for s, c in zip(shape, dcn))


def data_parallel_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """Every device on the pure data-parallel axis: for batch work with replicated weights (embedding,
    retrieval)."""
    return make_mesh({a: (-1 if a == "data" else 1) for a in MESH_AXES}, devices)


def fully_sharded_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """Every device on `fsdp`: weights split over all of them (imports, exports)."""
    return make_mesh({a: (-1 if a == "fsdp" else 1) for a in MESH_AXES}, devices)


def axis_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


# ----------------------------------------------------------------------------- logical -> mesh

def resolve(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=RULES) -> P:
    """Logical names of an array's dims -> PartitionSpec, honouring divisibility (see module docstring)."""
    if len(names) != len(shape):
        raise ShardingError(f"{len(names)} logical names {tuple(names)} for an array of shape {tuple(shape)}")
    result: list[tuple[str, ...] | None] = [None] * len(names)
    done = [n is None for n in names]
    used: set[str] = set()
    for name, axes in rules:
        if name not in names:
            continue
        pos = names.index(name)
        if done[pos]:
            continue
        if axes is None:
            done[pos] = True
            continue
        axes = tuple(a for a in axes if mesh.shape[a] > 1)  # size-1 axes shard nothing
        if not axes:
            continue
        if used.intersection(axes) or shape[pos] % axis_size(mesh, axes):
            continue
        result[pos] = axes
        done[pos] = True
        used.update(axes)
    return P(*[None if r is None else (r[0] if len(r) == 1 else r) for r in result])


def flax_rules(rules=RULES) -> list[tuple[str, Any]]:
    """The table in `nn.logical_axis_rules` format (first rule per name; flax does no divisibility check)."""
    seen, out = set(), []
    for name, axes in rules:
        if name in seen:
            continue
        seen.add(name)
        out.append((name, None if axes is None else (axes[0] if len(axes) == 1 else axes)))
    return out


@contextlib.contextmanager
def activation_rules(mesh: Mesh):
    """Make `ovjax.models.layers.constrain` effective: usable inside a jit trace (abstract mesh)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(flax_rules()):
        yield


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def unbox(tree):
    """Strip nn.Partitioned boxes without applying any constraint."""
    return jax.tree_util.tree_map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_shardings(boxed_params, mesh: Mesh, rules=RULES):
    """Boxed (nn.Partitioned) abstract or real params -> the unboxed tree of NamedSharding."""
    def one(path, leaf):
        if not _is_box(leaf):
            raise ShardingError(f"param {path_str(path)} has no logical axis names (not nn.Partitioned)")
        return NamedSharding(mesh, resolve(leaf.names, leaf.value.shape, mesh, rules))
    return jax.tree_util.tree_map_with_path(one, boxed_params, is_leaf=_is_box)


def logical_names(boxed_params):
    """Boxed params -> tree of their logical-name tuples (same structure as the unboxed params)."""
    return jax.tree_util.tree_map(lambda x: tuple(x.names), boxed_params, is_leaf=_is_box)


def match_shardings(tree, params, shardings, mesh: Mesh):
    """Shardings for a tree (optimizer state) whose leaves mirror params: a leaf whose trailing dict keys form
    a param's path and whose shape equals that param's gets the param's sharding; scalars are replicated.

    Raises ShardingError for any other non-scalar leaf, so nothing large is replicated by accident."""
    by_path = {}
    for (path, p), (_, s) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree_util.tree_flatten_with_path(shardings)[0]):
        by_path[tuple(k.key for k in path)] = (p.shape, s)
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        keys = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.insert(0, k.key)
        for start in range(len(keys)):
            hit = by_path.get(tuple(keys[start:]))
            if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
                return hit[1]
        if np.prod(leaf.shape, dtype=np.int64) <= 1:
            return replicated
        raise ShardingError(f"state leaf {path_str(path)} {tuple(leaf.shape)} matches no parameter")
    return jax.tree_util.tree_map_with_path(one, tree)


def logical_spec(logical: Sequence[str | None], mesh: Mesh | None = None) -> P:
    """Logical axis names -> PartitionSpec by each name's first rule, with no divisibility fallback (for
    batches, whose shapes are checked by `batch_shardings` instead). Mesh axes that `mesh` lacks are dropped."""
    table = dict(flax_rules())
    out = []
    for name in logical:
        axes = table.get(name) if name is not None else None
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.axis_names)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return P(*out)


def row_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows [N, ...] split over the batch axes, the rest whole (embedding and retrieval batches)."""
    return NamedSharding(mesh, logical_spec(("act_batch",) + (None,) * (ndim - 1), mesh))


def batch_shardings(batch, mesh: Mesh, micro_batches: int = 1):
    """Shardings of a packed batch dict (fields of ovjax/data/batch.py, from their logical axes); raises
    ShardingError naming the array and the axes when the rows of a micro-batch do not divide the batch mesh
    axes or a sharded dimension does not divide its axes (seq_len over `sequence`)."""
    out = {}
    for key, x in batch.items():
        shape = tuple(x.shape)
        field = batch_contract.FIELD.get(key)
        if field is None:
            raise ShardingError(f"batch[{key!r}] is not a field of the packed batch {batch_contract.BATCH_KEYS}")
        if len(shape) != len(field.dims):
            raise ShardingError(f"batch[{key!r}] has shape {shape}, the contract says {field.dims}")
        if shape[0] % micro_batches:
            raise ShardingError(f"batch[{key!r}] has {shape[0]} rows, not divisible by micro_batches={micro_batches}")
        spec = logical_spec(field.logical, mesh)
        rows, n_batch = shape[0] // micro_batches, axis_size(mesh, spec[0])
        if rows % n_batch:
            sizes = " x ".join(str(mesh.shape[a]) for a in ((spec[0],) if isinstance(spec[0], str) else spec[0]))
            names = " x ".join((spec[0],) if isinstance(spec[0], str) else spec[0])
            raise ShardingError(f"batch[{key!r}]: {rows} rows per micro-batch do not divide the batch mesh axes "
                                f"({names}) = {sizes} = {n_batch}")
        for dim in range(1, len(shape)):
            n = axis_size(mesh, spec[dim])
            if shape[dim] % n:
                what = "seq_len" if field.dims[dim] == "T" else f"dim {dim}"
                raise ShardingError(f"batch[{key!r}]: {what} {shape[dim]} does not divide mesh axis "
                                    f"{spec[dim]}={n}")
        out[key] = NamedSharding(mesh, spec)
    return out


def micro_batch_shardings(shardings: dict) -> dict:
    """Batch shardings [B, ...] -> those of the micro-batch view [M, B/M, ...] (`step.split_micro`): the new
    leading micro-batch axis unsharded, every row of a micro-batch where it was."""
    return {k: NamedSharding(s.mesh, P(None, *s.spec)) for k, s in shardings.items()}


def check_divisible(tree, shardings) -> None:
    """Raise ShardingError (which array, which dim, which axes) if a sharding does not divide its array."""
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree_util.tree_leaves(shardings)):
        spec = tuple(s.spec) + (None,) * (len(x.shape) - len(s.spec))
        for dim, axes in enumerate(spec):
            n = axis_size(s.mesh, axes)
            if x.shape[dim] % n:
                raise ShardingError(f"{path_str(path)}: dim {dim} (size {x.shape[dim]}) does not divide mesh "
                                    f"axes {axes} (size {n})")


# ----------------------------------------------------------------------------- init and accounting

def shard_bytes(x, sharding) -> int:
    """Bytes one device holds of array (or ShapeDtypeStruct) x under `sharding`."""
    shape = sharding.shard_shape(tuple(x.shape))
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def per_device_bytes(tree, shardings, memory_kind: str | None = None) -> int:
    """Bytes one device's shards of `tree` take; `memory_kind` ("device", "pinned_host"): only the arrays held
    there (a sharding without a memory kind is in device memory)."""
    return sum(shard_bytes(x, s) for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings))
               if memory_kind is None or (s.memory_kind or "device") == memory_kind)


def sharding_stats(tree, shardings, mesh: Mesh, ignore_axes: Iterable[str] = ("data",)) -> dict:
    """How well a param tree is sharded over the mesh (the `data` axis is replication by design).

    Returns total_bytes, per_device_bytes, ideal_per_device_bytes (total / devices of the non-ignored axes),
    excess (per_device / ideal - 1) and not_fully_sharded_bytes + fraction (bytes of arrays that are not split
    over every non-ignored axis), and `partial`: [(path, bytes, spec)] of those arrays, largest first."""
    n = math.prod(v for k, v in mesh.shape.items() if k not in ignore_axes)
    total = per_dev = 0
    partial = []
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree_util.tree_leaves(shardings)):
        b = int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        d = shard_bytes(x, s)
        total += b
        per_dev += d
        if d * n > b:
            partial.append((path_str(path), b, s.spec))
    partial.sort(key=lambda t: -t[1])
    ideal = total / n
    nfs = sum(b for _, b, _ in partial)
    return {"total_bytes": total, "per_device_bytes": per_dev, "ideal_per_device_bytes": ideal,
            "excess": per_dev / ideal - 1.0, "not_fully_sharded_bytes": nfs,
            "not_fully_sharded_fraction": nfs / total if total else 0.0, "partial": partial}


def layout_report(mesh: Mesh, params, param_shards, opt_state=None, opt_shards=None) -> str:
    """Lines to print at start (lesson 14): processes, devices, mesh, per-device param/optimizer bytes."""
    gib = 2 ** 30
    st = sharding_stats(params, param_shards, mesh)
    lines = [f"processes {jax.process_count()} (this is {jax.process_index()}), devices {jax.device_count()} "
             f"({jax.local_device_count()} local, {jax.devices()[0].platform})",
             "mesh " + " x ".join(f"{k}={v}" for k, v in mesh.shape.items()),
             f"params {st['total_bytes'] / gib:.3f} GiB total, {st['per_device_bytes'] / gib:.3f} GiB per device "
             f"(ideal {st['ideal_per_device_bytes'] / gib:.3f}); not fully sharded: "
             f"{100 * st['not_fully_sharded_fraction']:.2f}% of bytes"]
    if opt_state is not None:
        on_host = per_device_bytes(opt_state, opt_shards, "pinned_host")
        line = f"optimizer state {per_device_bytes(opt_state, opt_shards, 'device') / gib:.3f} GiB per device"
        lines.append(line + (f"; optimizer (host) {on_host / gib:.3f} GiB per device in pinned_host memory"
                             if on_host else ""))
    big = [(p, b, s) for p, b, s in st["partial"] if b >= 0.005 * st["total_bytes"]]
    for p, b, s in big[:10]:
        lines.append(f"  not fully sharded: {p} ({b / gib:.3f} GiB) spec {s}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- kernel specs (shard_map)

import dataclasses  # noqa: E402  (kept with the section that uses it)


@dataclasses.dataclass(frozen=True)
class AttentionSpecs:
    """How one attention kernel call is split over a mesh under `jax.shard_map` (derived from RULES).

    q / out [B, T, Hq, D]: batch over the batch axes, T over `sequence` when the query token axis is
    sequence-sharded, heads over `tensor`. k / v [B, S, Hkv, D]: the same but S never split (K/V are
    all-gathered over `sequence`). Segment ids follow their tokens. `sequence_axes`: the mesh axes T is split
    over (empty: not split), for the shard's offset."""

    q: P
    kv: P
    q_segments: P
    kv_segments: P
    sequence_axes: tuple[str, ...]

    def query_offset(self, local_len: int):
        """Inside the shard_map body: global position of this shard's first query (an int32 scalar)."""
        if not self.sequence_axes:
            return 0
        return jax.lax.axis_index(self.sequence_axes) * local_len


def attention_specs(mesh, q_shape: Sequence[int], kv_shape: Sequence[int], seq_name: str | None,
                    rules=RULES) -> AttentionSpecs:
    """Specs for q [B, T, Hq, D], k/v [B, S, Hkv, D] on `mesh` (a Mesh or AbstractMesh over MESH_AXES).

    seq_name: the logical name of the query token axis ("act_seq" in the LLM; None or an unsharded name such as
    "act_patches" in the ViT). Heads are split over `tensor` only when both Hq and Hkv divide it (a query head
    must find its kv head on the same device); otherwise they stay whole and only the batch is split."""
    missing = [a for a in MESH_AXES if a not in mesh.axis_names]
    if missing:
        raise ShardingError(f"attention under shard_map needs a mesh over {MESH_AXES}; mesh "
                            f"{tuple(mesh.axis_names)} lacks {missing}")
    q_spec = resolve(("act_batch", seq_name, "act_heads", None), q_shape, mesh, rules)
    kv_spec = resolve(("act_batch", None, "act_kv_heads", None), kv_shape, mesh, rules)
    batch, seq, heads = q_spec[0], q_spec[1], q_spec[2]
    if heads != kv_spec[2]:
        heads = None
    seq_axes = () if seq is None else ((seq,) if isinstance(seq, str) else tuple(seq))
    return AttentionSpecs(q=P(batch, seq, heads, None), kv=P(batch, None, heads, None),
                          q_segments=P(batch, seq), kv_segments=P(batch, None), sequence_axes=seq_axes)
