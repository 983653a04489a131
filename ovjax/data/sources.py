"""Readers of raw dataset formats for `ovjax.data.convert`: each yields `SourceSample`s in file order.

  LLaVA JSON (a list) or JSONL     `iter_llava_json`: {"id", "image": path | [paths], "conversations": [...]}
  parquet id / image / caption     `iter_parquet`: image bytes, or the {"bytes", "path"} struct HF datasets writes
  webdataset tars                  `iter_wds`: members <key>.<ext> grouped by key, read in memory, never extracted;
                                   chat lists, mixed media and caption packs too (`_wds_samples`)

A sample the reader cannot use carries `error` = (reason, detail) and is rejected by convert; a file that
cannot be read at all raises ConvertError.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ovjax.data import chat

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ConvertError(RuntimeError):
    """The run cannot go on (bad arguments, unreadable input file, reject threshold)."""


@dataclass
class ImageRef:
    """An image as bytes (parquet, tar) or as a path under an image root (JSON)."""

    data: bytes | None = None
    root: str | None = None
    path: object = None


@dataclass
class SourceSample:
    sample_id: str
    conversation: object = None
    images: list[ImageRef] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    error: tuple[str, str] | None = None      # (reason, detail) found while reading the source


# ----------------------------------------------------------------------------------------------- inputs

def glob_files(pattern: str) -> tuple[list[str], str]:
    """Sorted files of a glob ('**' recursive) and the glob's fixed leading folder (for relative names)."""
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise ConvertError(f"no files match {pattern!r}")
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    base = str(Path(*fixed)) if fixed else "."
    if len(fixed) == len(parts):
        base = str(Path(pattern).parent)
    return files, base


def caption_conversation(caption, prompt: str) -> list[dict]:
    user = chat.IMAGE_PLACEHOLDER + ("\n" + prompt if prompt else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": caption}]


def iter_llava_json(path: str, image_root: str) -> Iterator[SourceSample]:
    """Samples of a LLaVA-style JSON list (or JSONL) file."""
    name = os.path.basename(path)
    try:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                entries = [json.loads(line) for line in f if line.strip()]
        else:
            with open(path, encoding="utf-8") as f:
                entries = json.load(f)
    except (OSError, ValueError) as e:
        raise ConvertError(f"cannot read {path}: {e}") from e
    if not isinstance(entries, list):
        raise ConvertError(f"{path}: expected a JSON list of samples, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        meta = {"source": name, "index": str(i)}
        if not isinstance(entry, dict):
            yield SourceSample(f"{name}:{i}", meta=meta, error=("malformed_record", f"entry {i} is not a map"))
            continue
        sid = f"{name}:{entry.get('id', i)}"
        conv = entry.get("conversations", entry.get("messages"))
        if conv is None:
            yield SourceSample(sid, meta=meta, error=("malformed_record", "no 'conversations'"))
            continue
        img = entry.get("image", entry.get("images"))
        paths = [] if img is None else (img if isinstance(img, list) else [img])
        yield SourceSample(sid, conv, [ImageRef(root=image_root, path=p) for p in paths], meta)


def iter_parquet(path: str, base: str, *, id_column: str, image_column: str, caption_column: str,
                 prompt: str) -> Iterator[SourceSample]:
    """Caption samples of one parquet file (one row -> one sample)."""
    import pyarrow.parquet as pq

    rel = os.path.relpath(path, base)
    try:
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        missing = [c for c in (image_column, caption_column) if c not in names]
        if missing:
            raise ConvertError(f"{path}: no column(s) {missing}; columns are {sorted(names)}")
        cols = [c for c in (id_column, image_column, caption_column) if c in names]
        row = 0
        for batch in pf.iter_batches(batch_size=64, columns=cols):
            for rec in batch.to_pylist():
                meta = {"source": rel, "row": str(row)}
                rid = rec.get(id_column)
                sid = f"{rel}:{rid if rid is not None else row}"
                row += 1
                img = rec[image_column]
                data = img.get("bytes") if isinstance(img, dict) else img
                caption = rec[caption_column]
                if not isinstance(data, (bytes, bytearray)):
                    where = f" (only a path {img.get('path')!r})" if isinstance(img, dict) and img.get("path") else ""
                    yield SourceSample(sid, meta=meta, error=("missing_image", f"row {row - 1} has no image bytes"
                                                                               f"{where}"))
                    continue
                if not isinstance(caption, str):
                    yield SourceSample(sid, meta=meta, error=("malformed_record", f"caption is {caption!r:.40}"))
                    continue
                yield SourceSample(sid, caption_conversation(caption, prompt), [ImageRef(data=bytes(data))], meta)
    except ConvertError:
        raise
    except Exception as e:  # pyarrow raises many types for corrupt files
        raise ConvertError(f"cannot read parquet {path}: {type(e).__name__}: {e}") from e


def unsafe_member_name(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return bool(name.startswith(("/", "\\")) or p.is_absolute() or ".." in p.parts
                or re.match(r"^[A-Za-z]:", name))


def _natural_key(ext: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", ext)]


def _messages(doc):
    """A JSON list of chat messages ({role, content} or {from, value}) or None when `doc` is not one."""
    if isinstance(doc, list) and doc and all(isinstance(m, dict) for m in doc):
        return doc
    return None


def _wds_samples(rel: str, key: str, doc, parts: dict, prompt: str) -> list[SourceSample]:
    """The samples of one webdataset key whose <key>.json parsed to `doc`; `parts` maps the lower-cased
    member suffix after '<key>.' to its bytes. Layouts (first match wins):

      [messages...]                                    chat sample; images = every image member, natural order
      {"conversations"|"messages": [...]}              the same, wrapped in a map
      {"caption": str}                                 one caption sample
      {"texts": [...], "media": "image"|"video",       mixed media; images = the members `name` lists
       "name": [member suffixes, e.g. "0_a.jpg"]}      (in that order); video -> video_unsupported
      {"images": [...], "captions": [...],             caption pack: one caption sample per image, id
       "prompts": [...] (optional)}                    <rel>:<key>:<i>
    """
    meta = {"source": rel, "key": key}
    sid = f"{rel}:{key}"

    def bad(reason, detail, sample_id=sid, sample_meta=meta):
        return SourceSample(sample_id, meta=sample_meta, error=(reason, detail))

    def all_images():
        return [ImageRef(data=parts[ext]) for ext in sorted(parts, key=_natural_key)]

    conv = _messages(doc)
    if conv is not None:
        return [SourceSample(sid, conv, all_images(), meta)]
    if not isinstance(doc, dict):
        return [bad("malformed_record", f"{key}.json is neither a map nor a list of messages")]
    if "texts" in doc or "media" in doc:
        media, names, texts = doc.get("media"), doc.get("name"), _messages(doc.get("texts"))
        if media == "video":
            return [bad("video_unsupported", f"{key}.json is a video sample; video is not supported yet")]
        if media != "image":
            return [bad("malformed_record", f"{key}.json media is {media!r}, expected 'image' or 'video'")]
        if texts is None:
            return [bad("malformed_record", f"{key}.json texts is not a list of messages")]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return [bad("malformed_record", f"{key}.json name is not a list of member names")]
        missing = [n for n in names if n.lower() not in parts]
        if missing:
            return [bad("missing_image", f"{key}.json names {missing[0]!r}, no member {key}.{missing[0]} in the tar")]
        return [SourceSample(sid, texts, [ImageRef(data=parts[n.lower()]) for n in names], meta)]
    if "images" in doc or "captions" in doc:
        names, captions, prompts = doc.get("images"), doc.get("captions"), doc.get("prompts")
        if not (isinstance(names, list) and isinstance(captions, list) and len(names) == len(captions) > 0):
            return [bad("malformed_record", f"{key}.json images and captions must be lists of the same "
                                            "non-zero length")]
        if prompts is not None and not (isinstance(prompts, list) and len(prompts) == len(names)):
            return [bad("malformed_record", f"{key}.json prompts must be a list as long as images")]
        out = []
        for i, (name, caption) in enumerate(zip(names, captions)):
            m, isid = {**meta, "index": str(i)}, f"{sid}:{i}"
            p = prompts[i] if prompts is not None else prompt
            if not isinstance(name, str) or name.lower() not in parts:
                out.append(bad("missing_image", f"image {i} {name!r}: no member {key}.{name} in the tar", isid, m))
            elif not isinstance(caption, str) or not isinstance(p, str):
                out.append(bad("malformed_record", f"caption/prompt {i} is not a string", isid, m))
            else:
                conv = ([{"role": "user", "content": p}, {"role": "assistant", "content": caption}]
                        if chat.IMAGE_PLACEHOLDER in p else caption_conversation(caption, p))
                out.append(SourceSample(isid, conv, [ImageRef(data=parts[name.lower()])], m))
        return out
    conv = doc.get("conversations", doc.get("messages"))
    if conv is None and "caption" in doc:
        if not isinstance(doc["caption"], str):
            return [bad("malformed_record", "caption is not a string")]
        conv = caption_conversation(doc["caption"], prompt)
    if conv is None:
        return [bad("malformed_record", f"{key}.json has no conversations, messages, caption, texts or images")]
    return [SourceSample(sid, conv, all_images(), meta)]


def iter_wds(path: str, base: str, *, prompt: str, ignored: collections.Counter) -> Iterator[SourceSample]:
    """Samples of one webdataset tar: consecutive members sharing a key form a sample (see `_wds_samples`)."""
    rel = os.path.relpath(path, base)

    def build(key: str, parts: dict, error) -> list[SourceSample]:
        meta = {"source": rel, "key": key}
        sid = f"{rel}:{key}"
        if error:
            return [SourceSample(sid, meta=meta, error=error)]
        if "json" not in parts:
            return [SourceSample(sid, meta=meta, error=("missing_json", f"no {key}.json in the tar"))]
        try:
            doc = json.loads(parts.pop("json").decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return [SourceSample(sid, meta=meta, error=("malformed_record", f"{key}.json: {e}"))]
        return _wds_samples(rel, key, doc, parts, prompt)

    try:
        with tarfile.open(path, mode="r:*") as tf:
            key, parts, error = None, {}, None
            for m in tf:
                if m.isdir():
                    continue
                name = m.name
                dirname, _, basename = name.rpartition("/")
                stem, dot, ext = basename.partition(".")
                mkey = (dirname + "/" if dirname else "") + stem
                if mkey != key:
                    if key is not None:
                        yield from build(key, parts, error)
                    key, parts, error = mkey, {}, None
                if unsafe_member_name(name):
                    error = error or ("unsafe_tar_member", f"member {name!r} has an absolute path or '..'")
                    continue
                if not m.isfile():
                    error = error or ("unsafe_tar_member", f"member {name!r} is not a regular file")
                    continue
                ext = ext.lower()
                if ext in parts:
                    error = error or ("malformed_record", f"member {name!r} appears twice")
                elif ext == "json" or ext.rpartition(".")[2] in IMAGE_EXTS:
                    f = tf.extractfile(m)
                    parts[ext] = f.read() if f is not None else b""
                else:
                    ignored[ext or "(none)"] += 1
            if key is not None:
                yield from build(key, parts, error)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ConvertError(f"cannot read tar {path}: {type(e).__name__}: {e}") from e
