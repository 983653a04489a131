"""Grain loader of packed ArrayRecord shards: global, sharded, resumable batches of the packed contract.

    loader = PackedLoader("data/packed", seq_len=8192, max_patches=32768, max_images=64, max_segments=64,
                          global_batch_size=16, mesh=mesh, seed=0, worker_count=2)
    for batch in loader:            # dict of global jax.Arrays, see below
        loss = step(batch)
        loader.last_stats           # host-local counters of that batch (samples, supervised tokens, ...)
    state = loader.get_state()      # JSON dict; save with orbax.checkpoint.args.JsonSave(state)
    loader.set_state(state)         # the next batch is the one that followed when `state` was taken

The pipeline (grain Dataset API): ArrayRecordDataSource -> MapDataset.source -> shuffle(seed) ->
repeat(num_epochs) (grain folds the epoch into the shuffle seed, so every epoch has its own order) ->
one global stream of packed rows; this process takes rows `shard_index::shard_count` of it -> map(build_row)
(decode + smart_resize + patchify, in the grain workers) -> batch(local rows) -> [k:] (resume) ->
to_iter_dataset -> mp_prefetch(worker_count). Global batch k is always rows [k*B, (k+1)*B) of the global
stream, whatever the worker count or process count, so the iterator state is just k (plus checks).

The batch is `ovjax.data.batch`'s contract (B = global batch, T = seq_len, P = max_patches; rows written by
its RowWriter), text-only rows included; on a mesh every field arrives in `sharding.batch_shardings`, the
step's input sharding. Patches travel as uint8 pixels (4x fewer bytes through the workers and to the device)
and are normalised on the device by a lookup table built with `images.normalize_uint8`, so the values equal
`images.preprocess(..., dtype=float32)` bit for bit; padding patches are 0.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np

from ovjax.data import batch as batch_lib
from ovjax.data import images, schema

STATE_FORMAT = "ovjax-loader"
STATE_VERSION = 1


class LoaderError(ValueError):
    """Bad packed data or loader arguments."""


# ----------------------------------------------------------------------------------------------- rows


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """Static shapes of one packed row and the image preprocessing that the raw grids assume."""

    seq_len: int
    max_patches: int
    max_images: int | None = None
    max_segments: int | None = None
    patch_size: int = images.PATCH_SIZE
    merge_size: int = images.MERGE_SIZE
    min_pixels: int = images.MIN_PIXELS
    max_pixels: int = images.MAX_PIXELS

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size


def build_row(data: bytes, spec: RowSpec) -> dict[str, np.ndarray]:
    """One packed record -> one row of the batch contract, patches as uint8 pixels.

    Returns tokens/targets/segment_ids/positions int32 [T], loss_mask bool [T], patches uint8 [P, 588],
    patch_segment int32 [P], patch_hw int32 [P, 2], and counters (int64 scalars) samples, tokens,
    supervised_tokens, images, patches. Raises LoaderError when the bin breaks a budget or an image's
    grid differs from the recorded one (the data was made with other min/max_pixels).
    """
    rec = schema.validate_packed(schema.loads(data))
    samples = rec["samples"]
    if spec.max_segments is not None and len(samples) > spec.max_segments:
        raise LoaderError(f"bin of {len(samples)} samples exceeds max_segments={spec.max_segments}")
    n_img = sum(len(s["images"]) for s in samples)
    if spec.max_images is not None and n_img > spec.max_images:
        raise LoaderError(f"bin of {n_img} images exceeds max_images={spec.max_images}")
    writer = batch_lib.RowWriter(spec.seq_len, spec.max_patches, patch_dim=spec.patch_dim, patch_dtype=np.uint8,
                                 merge_size=spec.merge_size)
    for s in samples:
        try:
            writer.add_sample(s["tokens"], s["loss_mask"])
        except batch_lib.BatchError as e:
            raise LoaderError(f"bin of {e} (sample {s['id']!r})") from e
        for data_i, grid in zip(s["images"], s["grids"]):
            try:
                pixels, got = images.preprocess(
                    images.decode_image(data_i), patch_size=spec.patch_size, merge_size=spec.merge_size,
                    min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, dtype=np.uint8)
            except images.ImageRejected as e:
                raise LoaderError(f"sample {s['id']!r}: image {writer.images} unusable: {e}") from e
            if tuple(int(g) for g in grid) != tuple(got):
                raise LoaderError(f"sample {s['id']!r}: image grid {tuple(got)} differs from the recorded "
                                  f"{tuple(int(g) for g in grid)}; min/max_pixels differ from the conversion's")
            try:
                writer.add_image(pixels, got)
            except batch_lib.BatchError as e:
                raise LoaderError(f"bin of {e} (sample {s['id']!r})") from e
    row = writer.row()
    row.update(samples=np.int64(writer.samples), tokens_count=np.int64(writer.tokens_used),
               supervised_tokens=np.int64(writer.supervised), images=np.int64(writer.images),
               patches_count=np.int64(writer.patches_used))
    return row


class _BuildRow:
    """Picklable map for the grain workers."""

    def __init__(self, spec: RowSpec):
        self.spec = spec

    def __call__(self, data: bytes) -> dict[str, np.ndarray]:
        return build_row(data, self.spec)


def split_counters(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(contract arrays, summed counters) of a numpy batch from the grain pipeline."""
    arrays = {k: batch[k] for k in batch_lib.BATCH_KEYS}
    stats = {"rows": int(batch["tokens"].shape[0]), "samples": int(batch["samples"].sum()),
             "tokens": int(batch["tokens_count"].sum()),
             "supervised_tokens": int(batch["supervised_tokens"].sum()),
             "images": int(batch["images"].sum()), "patches": int(batch["patches_count"].sum())}
    return arrays, stats


def normalize_patches_np(patches: np.ndarray, patch_segment: np.ndarray) -> np.ndarray:
    """uint8 [..., P, 588] -> float32 CLIP-normalised, 0 where patch_segment == 0 (host version)."""
    out = images.normalize_uint8(patches, np.float32)
    out[patch_segment == 0] = 0
    return out


def normalize_lut() -> np.ndarray:
    """float32 [3, 256]: images.normalize_uint8 of every level per channel."""
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)  # [256, 3]: one value per channel
    return np.ascontiguousarray(images.normalize_uint8(levels, np.float32).T)


# ----------------------------------------------------------------------------------------------- data


def resolve_packed(data: str | Sequence[str]) -> tuple[list[str], dict | None]:
    """Shard paths of a packed set (directory with manifest.json, glob, or list) and its manifest."""
    if isinstance(data, (list, tuple)):
        paths, manifest = [str(p) for p in data], None
    elif os.path.isdir(data):
        mpath = os.path.join(data, "manifest.json")
        if not os.path.exists(mpath):
            raise LoaderError(f"{data} has no manifest.json")
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != "ovjax-packed":
            raise LoaderError(f"{mpath} is not a packed set (format {manifest.get('format')!r})")
        paths = [os.path.join(data, s["file"]) for s in manifest["shards"]]
    else:
        paths, manifest = sorted(globlib.glob(data)), None
    if not paths:
        raise LoaderError(f"no packed shards in {data!r}")
    for p in paths:
        if not os.path.exists(p):
            raise LoaderError(f"missing packed shard {p}")
    return paths, manifest


def _check_manifest_budgets(manifest: dict | None, spec: RowSpec) -> None:
    if manifest is None:
        return
    params = manifest.get("parameters", {})
    for name, mine in (("seq_len", spec.seq_len), ("max_patches", spec.max_patches),
                       ("max_images", spec.max_images), ("max_segments", spec.max_segments)):
        theirs = params.get(name)
        if mine is not None and (theirs is None or theirs > mine):
            raise LoaderError(f"the packed set was made with {name}={theirs}, larger than the loader's {mine}")


def process_rows(sharding, global_batch_size: int, shape: Sequence[int] | None = None) -> tuple[int, int]:
    """(shard_index, shard_count) of this process's rows of the global batch under `sharding`.

    shape: the full shape of an array under `sharding` (default [B]); only its rows matter here.

    This process must address one contiguous block of rows [start, start + n) with n dividing B;
    processes that address the same block (replicas) get the same shard index, so the same data.
    """
    idx = sharding.addressable_devices_indices_map(tuple(shape or (global_batch_size,)))
    spans = set()
    for index in idx.values():
        sl = index[0] if index else slice(None)
        spans.add(tuple(range(global_batch_size))[sl])
    rows = sorted({r for span in spans for r in span})
    start, n = rows[0], len(rows)
    if rows != list(range(start, start + n)) or global_batch_size % n or start % n:
        raise LoaderError(f"this process addresses batch rows {rows[:8]}... of {global_batch_size}; the loader "
                          "needs one contiguous block whose size divides the global batch")
    return start // n, global_batch_size // n


# ----------------------------------------------------------------------------------------------- loader


class PackedLoader:
    """Iterator of global packed batches (dict of jax.Array, or numpy without a sharding/mesh).

    data: packed directory (manifest.json), glob or list of shards. shardings: {field: NamedSharding}, the
    step's input shardings (`ovjax.sharding.batch_shardings`), so batches arrive where the step wants them;
    fields without a sharding (image fields of a text-only step) are not sent. mesh: shorthand for
    `sharding.batch_shardings` of this loader's shapes on `mesh` (micro_batches only adds its divisibility
    check). Without either, batches stay numpy on the host (patches normalised there) and this process reads
    every row.
    num_epochs: None = forever. worker_count: grain processes (0 = in-process threads only).
    """

    def __init__(self, data: str | Sequence[str], *, seq_len: int, max_patches: int, global_batch_size: int,
                 max_images: int | None = None, max_segments: int | None = None,
                 shardings: dict | None = None, mesh=None, micro_batches: int = 1, seed: int = 0,
                 num_epochs: int | None = None, worker_count: int = 0, worker_buffer_size: int = 2,
                 read_threads: int = 2, prefetch_buffer_size: int = 2, patch_size: int = images.PATCH_SIZE,
                 merge_size: int = images.MERGE_SIZE, min_pixels: int = images.MIN_PIXELS,
                 max_pixels: int = images.MAX_PIXELS):
        import grain

        if global_batch_size < 1:
            raise LoaderError("global_batch_size must be >= 1")
        if num_epochs is not None and num_epochs < 1:
            raise LoaderError("num_epochs must be >= 1 or None")
        self.spec = RowSpec(seq_len, max_patches, max_images, max_segments, patch_size, merge_size,
                            min_pixels, max_pixels)
        self.paths, self.manifest = resolve_packed(data)
        _check_manifest_budgets(self.manifest, self.spec)
        if shardings is None and mesh is not None:
            import jax

            from ovjax import sharding as sharding_lib

            structs = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in
                       batch_lib.shapes(global_batch_size, seq_len, max_patches, patch_dim=self.spec.patch_dim).items()}
            shardings = sharding_lib.batch_shardings(structs, mesh, micro_batches)
        if shardings is not None:
            missing = [k for k in batch_lib.TOKEN_KEYS if k not in shardings]
            unknown = sorted(set(shardings) - set(batch_lib.BATCH_KEYS))
            if missing or unknown:
                raise LoaderError(f"shardings must cover {missing} and name only batch fields (unknown: {unknown})")
            if any(k in shardings for k in batch_lib.IMAGE_KEYS) and not all(
                    k in shardings for k in batch_lib.IMAGE_KEYS):
                raise LoaderError(f"shardings name some image fields but not all of {batch_lib.IMAGE_KEYS}")
        self.shardings = shardings
        self.global_batch_size = global_batch_size
        if shardings is not None:
            self.shard_index, self.shard_count = process_rows(shardings["tokens"], global_batch_size,
                                                                (global_batch_size, seq_len))
        else:
            self.shard_index, self.shard_count = 0, 1
        self.local_batch_size = global_batch_size // self.shard_count
        self.seed, self.num_epochs = seed, num_epochs
        self.worker_count, self.worker_buffer_size = worker_count, worker_buffer_size
        self._read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size)

        self._source = grain.sources.ArrayRecordDataSource(self.paths)
        self.num_rows = len(self._source)
        if self.num_rows == 0:
            raise LoaderError("the packed set holds no rows")
        stream = grain.MapDataset.source(self._source).shuffle(seed=seed).repeat(num_epochs)
        if num_epochs is not None:
            self.num_batches: int | None = num_epochs * self.num_rows // global_batch_size
            if self.num_batches == 0:
                raise LoaderError(f"{num_epochs} epoch(s) of {self.num_rows} rows fill no batch of {global_batch_size}")
            stream = stream[:self.num_batches * global_batch_size]
        else:
            self.num_batches = None
        self._batches = (stream[self.shard_index::self.shard_count].map(_BuildRow(self.spec))
                         .batch(self.local_batch_size, drop_remainder=True))
        self._fingerprint = hashlib.sha256(json.dumps(
            [[os.path.basename(p) for p in self.paths], self.num_rows,
             (self.manifest or {}).get("shards")], sort_keys=True).encode()).hexdigest()[:16]
        self._next_batch = 0
        self._iter = None
        self._device_fns = None
        self.last_stats: dict[str, int] = {}

    # -- iteration

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (global rows handed out / rows per epoch)."""
        return self._next_batch * self.global_batch_size / self.num_rows

    def _start(self):
        ds = self._batches[self._next_batch:].to_iter_dataset(self._read_options)
        if self.worker_count > 0:
            import grain
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain reads absl flags in mp_prefetch (lessons 10b)
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count,
                                                             per_worker_buffer_size=self.worker_buffer_size))
        self._iter = iter(ds)

    def __iter__(self) -> "PackedLoader":
        return self

    def next_numpy(self) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """This process's rows of the next batch, patches uint8, and its counters."""
        if self.num_batches is not None and self._next_batch >= self.num_batches:
            raise StopIteration
        if self._iter is None:
            self._start()
        batch = next(self._iter)
        self._next_batch += 1
        return split_counters(batch)

    def __next__(self) -> dict[str, Any]:
        arrays, stats = self.next_numpy()
        self.last_stats = stats
        if self.shardings is None:
            arrays["patches"] = normalize_patches_np(arrays["patches"], arrays["patch_segment"])
            return arrays
        return self._to_global(arrays)

    def _to_global(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        import jax

        out = {k: jax.make_array_from_process_local_data(self.shardings[k], v, (self.global_batch_size, *v.shape[1:]))
               for k, v in arrays.items() if k in self.shardings}
        if "patches" in out:
            if self._device_fns is None:
                self._device_fns = _device_normalizer(self.shardings["patches"], self.shardings["patch_segment"])
            out["patches"] = self._device_fns(out["patches"], out["patch_segment"])
        return out

    # -- state

    def get_state(self) -> dict:
        """JSON-serialisable position: the next global batch index plus what it is only valid for."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "next_batch": self._next_batch,
                "seed": self.seed, "global_batch_size": self.global_batch_size, "num_rows": self.num_rows,
                "num_epochs": self.num_epochs, "data": self._fingerprint}

    def set_state(self, state: dict) -> None:
        """Continue after the batch where `state` was taken (any worker or process count)."""
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise LoaderError(f"not an {STATE_FORMAT} v{STATE_VERSION} state: {state!r}")
        mine = self.get_state()
        for key in ("seed", "global_batch_size", "num_rows", "num_epochs", "data"):
            if state.get(key) != mine[key]:
                raise LoaderError(f"state was taken with {key}={state.get(key)!r}, this loader has {mine[key]!r}")
        nxt = int(state["next_batch"])
        if nxt < 0 or (self.num_batches is not None and nxt > self.num_batches):
            raise LoaderError(f"state next_batch={nxt} is outside 0..{self.num_batches}")
        self.close()
        self._next_batch = nxt

    def close(self) -> None:
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def __enter__(self) -> "PackedLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _device_normalizer(patch_sharding, segment_sharding):
    """jit'ed uint8 [B,P,D] (+ patch_segment [B,P]) -> float32 normalised patches, 0 for padding.

    A table lookup per device (shard_map), so the values are the host table's bit for bit, on any mesh
    and axis type.
    """
    import jax
    import jax.numpy as jnp

    table = normalize_lut().reshape(-1)  # [3*256], channel-major

    def local(patches, patch_segment):
        chan = (jnp.arange(patches.shape[-1]) // (patches.shape[-1] // 3)) * 256
        vals = jnp.asarray(table)[chan + patches.astype(jnp.int32)]
        return jnp.where(patch_segment[..., None] > 0, vals, jnp.float32(0))

    return jax.jit(jax.shard_map(local, mesh=patch_sharding.mesh, in_specs=(patch_sharding.spec, segment_sharding.spec),
                                 out_specs=patch_sharding.spec), out_shardings=patch_sharding)


def global_counters(batch: dict[str, Any]) -> dict[str, Any]:
    """Counters of a (global) batch computed from its arrays: samples, tokens, supervised tokens, images.

    Works on numpy or jax arrays; under jit on a global batch it gives global numbers.
    """
    xp = np if isinstance(batch["segment_ids"], np.ndarray) else __import__("jax").numpy
    return {"samples": xp.sum(xp.max(batch["segment_ids"], axis=1)),
            "tokens": xp.sum(batch["segment_ids"] > 0),
            "supervised_tokens": xp.sum(batch["loss_mask"]),
            "images": xp.sum(xp.max(batch["patch_segment"], axis=1))}
