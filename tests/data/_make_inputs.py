"""Small inputs for the data tests: a tiny tokenizer, encoded images, LLaVA JSON, parquet, webdataset tars."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CORPUS = [
    "You are a helpful assistant.",
    "What is in the image? Describe it in detail.",
    "A cat sits on a red mat next to a small dog.",
    "The picture shows a city street at night with cars and lights.",
    "user assistant system image caption photo",
    "Two birds fly over the sea while the sun sets behind the hills.",
] * 20


def make_tokenizer(out_dir) -> Path:
    from ovjax.data.tokenizer import build_tokenizer

    return build_tokenizer(out_dir, CORPUS, vocab_size=400)


def image_array(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    rs = np.random.RandomState(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rs.randint(0, 256, shape, dtype=np.uint8)


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_bytes(h: int, w: int, seed: int = 0) -> bytes:
    return encode(Image.fromarray(image_array(h, w, seed)), "PNG")


def jpeg_bytes(h: int, w: int, seed: int = 0) -> bytes:
    return encode(Image.fromarray(image_array(h, w, seed)), "JPEG")


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def write_parquet(path: Path, rows: list[dict], image_as_struct: bool) -> Path:
    """rows: {"id", "image": bytes | None, "caption", optional "path"}; struct = HF datasets' Image layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    if image_as_struct:
        imgs = [{"bytes": r["image"], "path": r.get("path")} for r in rows]
        img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    else:
        imgs = [r["image"] for r in rows]
        img_type = pa.binary()
    table = pa.table({"id": pa.array([r["id"] for r in rows], pa.string()),
                      "image": pa.array(imgs, img_type),
                      "caption": pa.array([r["caption"] for r in rows], pa.string())})
    pq.write_table(table, path)
    return path


def write_tar(path: Path, members: list) -> Path:
    """members: (name, bytes) regular files, or (name, None, linkname) symlinks, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for m in members:
            info = tarfile.TarInfo(m[0])
            if m[1] is None:
                info.type = tarfile.SYMTYPE
                info.linkname = m[2]
                tf.addfile(info)
            else:
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def conv(user: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
