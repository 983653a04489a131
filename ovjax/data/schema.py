"""Record layouts of ovjax data files: msgpack maps holding numpy arrays, versioned, never pickled.

Two layouts, each one msgpack map per ArrayRecord record:

Raw sample (written by `ovjax.data.convert`, read by `ovjax.data.pack`):
    version      int               RAW_VERSION
    kind         "raw"
    id           str               unique sample id (source-qualified)
    tokens       int32 [L]         token ids, every image already expanded to
                                   <|vision_start|> + K x <|image_pad|> + <|vision_end|>
    loss_mask    bool  [L]         True where the token is supervised (assistant span tokens)
    images       list[bytes]       encoded images (JPEG/PNG bytes as stored at the source), in
                                   placeholder order
    grids        int32 [N, 3]      (t, h, w) patch grid of each image after smart_resize
    meta         dict[str, str]    free-form provenance (source file, row), optional

Packed bin (written by `ovjax.data.pack`, read by `ovjax.data.loader`):
    version      int               PACKED_VERSION
    kind         "packed"
    samples      list[raw sample]  the samples of the bin, in packing order

Arrays are stored as {"__nd__": True, "dtype": str, "shape": [...], "data": bytes}; only plain numeric
dtypes are accepted when decoding, so a record can never make the reader execute code.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

RAW_VERSION = 1
PACKED_VERSION = 1

_ALLOWED_DTYPES = frozenset(
    ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
     "float16", "float32", "float64"]
)


class RecordError(ValueError):
    """A record does not follow the layout above."""


def _encode_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.name not in _ALLOWED_DTYPES:
            raise RecordError(f"cannot store array of dtype {obj.dtype}")
        return {"__nd__": True, "dtype": obj.dtype.name, "shape": list(obj.shape),
                "data": np.ascontiguousarray(obj).tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in a record")


def _decode_hook(obj: dict) -> Any:
    if obj.get("__nd__") is True:
        dtype = obj["dtype"]
        if dtype not in _ALLOWED_DTYPES:
            raise RecordError(f"refusing array of dtype {dtype!r}")
        shape = tuple(int(s) for s in obj["shape"])
        arr = np.frombuffer(obj["data"], dtype=np.dtype(dtype))
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise RecordError(f"array data of {arr.size} items does not fit shape {shape}")
        return arr.reshape(shape)
    return obj


def dumps(obj: dict) -> bytes:
    """Serialise a record map (numpy arrays allowed anywhere inside) to bytes."""
    return msgpack.packb(obj, default=_encode_default, use_bin_type=True)


def loads(data: bytes) -> dict:
    """Inverse of `dumps`. Arrays come back read-only views of the record bytes."""
    try:
        obj = msgpack.unpackb(data, object_hook=_decode_hook, raw=False, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as e:
        if isinstance(e, RecordError):
            raise
        raise RecordError(f"undecodable record: {e}") from e
    if not isinstance(obj, dict):
        raise RecordError(f"record is a {type(obj).__name__}, expected a map")
    return obj


def make_raw(sample_id: str, tokens, loss_mask, images: list[bytes], grids, meta: dict | None = None) -> dict:
    """Build a raw sample map, checking types and shapes."""
    tokens = np.asarray(tokens, dtype=np.int32)
    loss_mask = np.asarray(loss_mask, dtype=bool)
    grids = np.asarray(grids, dtype=np.int32).reshape(-1, 3)
    rec = {"version": RAW_VERSION, "kind": "raw", "id": str(sample_id), "tokens": tokens,
           "loss_mask": loss_mask, "images": [bytes(b) for b in images], "grids": grids,
           "meta": {str(k): str(v) for k, v in (meta or {}).items()}}
    validate_raw(rec)
    return rec


def validate_raw(rec: dict) -> dict:
    """Check a raw sample map; returns it. Raises RecordError with the reason."""
    if rec.get("kind") != "raw":
        raise RecordError(f"expected a raw sample, got kind={rec.get('kind')!r}")
    if rec.get("version") != RAW_VERSION:
        raise RecordError(f"raw sample version {rec.get('version')!r}, this reader knows {RAW_VERSION}")
    for key in ("id", "tokens", "loss_mask", "images", "grids"):
        if key not in rec:
            raise RecordError(f"raw sample misses {key!r}")
    tokens, mask, grids = rec["tokens"], rec["loss_mask"], rec["grids"]
    if tokens.ndim != 1 or tokens.dtype != np.int32:
        raise RecordError(f"tokens must be int32 [L], got {tokens.dtype} {tokens.shape}")
    if mask.shape != tokens.shape or mask.dtype != bool:
        raise RecordError(f"loss_mask must be bool {tokens.shape}, got {mask.dtype} {mask.shape}")
    if grids.ndim != 2 or grids.shape[1] != 3 or grids.shape[0] != len(rec["images"]):
        raise RecordError(f"grids must be [{len(rec['images'])}, 3], got {grids.shape}")
    if (grids <= 0).any():
        raise RecordError("grids must be positive")
    return rec


def num_patches(rec: dict) -> int:
    """ViT patches of a raw sample: sum of t*h*w over its images."""
    g = rec["grids"]
    return int((g[:, 0].astype(np.int64) * g[:, 1] * g[:, 2]).sum()) if len(g) else 0


def make_packed(samples: list[dict]) -> dict:
    return {"version": PACKED_VERSION, "kind": "packed", "samples": samples}


def validate_packed(rec: dict) -> dict:
    if rec.get("kind") != "packed":
        raise RecordError(f"expected a packed bin, got kind={rec.get('kind')!r}")
    if rec.get("version") != PACKED_VERSION:
        raise RecordError(f"packed version {rec.get('version')!r}, this reader knows {PACKED_VERSION}")
    for s in rec.get("samples", ()):
        validate_raw(s)
    return rec
