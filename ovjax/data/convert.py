"""Convert raw datasets into raw-sample ArrayRecord shards (`schema.make_raw`) plus manifest.json.

Inputs (any mix; read JSON files, then parquet globs, then tar globs, each in the order given; glob files sorted):
  --json FILE --image-root DIR   LLaVA JSON (a list) or JSONL of {"id", "image": path | [paths] (optional),
                                 "conversations": [{"from"/"role", "value"/"content"}, ...]}; image paths are
                                 relative to the image root and may not leave it ('..', absolute, symlinks).
  --parquet GLOB                 parquet files with id / image / caption columns (image: bytes, or the
                                 {"bytes", "path"} struct HF datasets writes); '**' matches nested folders.
  --wds GLOB                     webdataset tars: members <key>.<ext> grouped by key; <key>.json holds
                                 "conversations" / "messages" or "caption"; images <key>.jpg|jpeg|png|webp
                                 (several: <key>.img0.jpg, <key>.img1.jpg, ... in numeric order). The
                                 upstream layouts too: <key>.json a JSON list of messages (chat samples);
                                 {"texts", "media", "name"} with members <key>.0_<file>, ... (mixed media;
                                 "video" rejected as video_unsupported); {"images", "captions", "prompts"}
                                 with <key>.img0.jpg, ... (caption packs: one sample per image, id
                                 <tar>:<key>:<i>). Read with
                                 tarfile in memory, never extracted; members with absolute paths, '..' or
                                 that are links/devices reject their sample.
A caption becomes user "<image>" (or "<image>\\n" + --caption-prompt) + assistant caption.

Per sample: load and fully decode every image, cap its longest side (--max-side, re-encoded as PNG), smart_resize grid, chat template with image expansion and
assistant loss mask (ovjax.data.chat), length <= --seq-len. Failures are rejected with a reason from
`REJECT_REASONS`, written to rejects.jsonl and counted in the manifest; past --max-reject-fraction
(checked once --abort-min-samples samples were seen, and at the end) the run aborts with exit code 1, the
manifest still written (status "aborted"). Output order is input order whatever --workers is.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ovjax.data import chat, images, io, schema
from ovjax.data.sources import (ConvertError, ImageRef, SourceSample, glob_files, iter_llava_json,
                                iter_parquet, iter_wds, unsafe_member_name)
from ovjax.data.images import Rejected

# Reasons raised here (images.REJECT_REASONS and chat.REJECT_REASONS add theirs).
CONVERT_REASONS = (
    "malformed_record",     # a source row/entry/json that is not the expected layout
    "missing_image",        # the image file does not exist (or a parquet row has no image bytes)
    "bad_image_path",       # an image path that is absolute, has '..', or resolves outside the image root
    "unsafe_tar_member",    # a tar member with an absolute path, '..', or that is not a regular file
    "missing_json",         # a webdataset sample without its <key>.json
    "video_unsupported",    # a webdataset mixed-media sample whose media is "video" (no video path yet)
    "too_long",             # more tokens than --seq-len
    "duplicate_id",         # a sample id seen before in this run
)
REJECT_REASONS = tuple(images.REJECT_REASONS) + tuple(chat.REJECT_REASONS) + CONVERT_REASONS

MANIFEST_FORMAT = "ovjax-raw"


class ConvertRejected(Rejected):
    reasons = CONVERT_REASONS


# ------------------------------------------------------------------------------------ per-sample work

@dataclass(frozen=True)
class Params:
    tokenizer: str
    seq_len: int = 8192
    min_pixels: int = images.MIN_PIXELS
    max_pixels: int = images.MAX_PIXELS
    patch_size: int = images.PATCH_SIZE
    merge_size: int = images.MERGE_SIZE
    caption_prompt: str = ""
    default_system: str = chat.DEFAULT_SYSTEM
    max_side: int = 0          # longest image side in pixels before smart_resize (0 = no cap); upstream stage 2: 1000


def cap_longest_side(image, max_side: int) -> tuple[object, bytes]:
    """An RGB PIL image whose longest side is over `max_side` -> (the image scaled down to it, aspect kept,
    bicubic; its PNG bytes). The raw record stores these bytes, so the loader sees the capped image."""
    import io as stdio

    from PIL import Image

    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    small = image.resize(size, Image.BICUBIC)
    buf = stdio.BytesIO()
    small.save(buf, format="PNG")
    return small, buf.getvalue()


def resolve_image_path(root: str, rel) -> str:
    """Absolute path of image `rel` under `root`; ConvertRejected if it escapes the root or is missing."""
    if not isinstance(rel, str) or not rel:
        raise ConvertRejected("bad_image_path", f"image path {rel!r} is not a non-empty string")
    if os.path.isabs(rel) or unsafe_member_name(rel):
        raise ConvertRejected("bad_image_path", f"image path {rel!r} is absolute or contains '..'")
    real_root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([full, real_root]) != real_root:
        raise ConvertRejected("bad_image_path", f"image path {rel!r} resolves outside the image root")
    if not os.path.isfile(full):
        raise ConvertRejected("missing_image", f"no image file {rel!r} under {root}")
    return full


class Worker:
    """Does the per-sample work; one per process."""

    def __init__(self, params: Params):
        from transformers import AutoTokenizer

        self.params = params
        tok = AutoTokenizer.from_pretrained(params.tokenizer)
        self.template = chat.ChatTemplate(tok, default_system=params.default_system, merge_size=params.merge_size)

    def _load(self, ref: ImageRef) -> bytes:
        if ref.data is not None:
            return ref.data
        full = resolve_image_path(ref.root, ref.path)
        try:
            with open(full, "rb") as f:
                return f.read()
        except OSError as e:
            raise ConvertRejected("missing_image", f"cannot read {ref.path!r}: {e}") from e

    def process(self, s: SourceSample):
        """("ok", record bytes, stats) or ("reject", reason, detail)."""
        p = self.params
        try:
            if s.error:
                return ("reject", *s.error)
            datas, grids = [], []
            for ref in s.images:
                data = self._load(ref)
                im = images.decode_image(data)
                if p.max_side and max(im.size) > p.max_side:
                    im, data = cap_longest_side(im, p.max_side)
                grids.append(images.image_grid(im.height, im.width, patch_size=p.patch_size,
                                               merge_size=p.merge_size, min_pixels=p.min_pixels,
                                               max_pixels=p.max_pixels))
                datas.append(data)
            tokens, mask = self.template.encode(s.conversation, grids)
            if len(tokens) > p.seq_len:
                raise ConvertRejected("too_long", f"{len(tokens)} tokens > seq_len {p.seq_len}")
            rec = schema.make_raw(s.sample_id, tokens, mask, datas, grids if grids else [], s.meta)
        except Rejected as e:
            return "reject", e.reason, e.detail
        stats = {"tokens": len(tokens), "supervised_tokens": int(mask.sum()), "images": len(datas),
                 "patches": schema.num_patches(rec)}
        return "ok", schema.dumps(rec), stats


_WORKER: Worker | None = None


def _init_worker(params: Params) -> None:
    global _WORKER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER = Worker(params)


def _process_pair(batch: list[SourceSample]) -> list:
    return [(s, _WORKER.process(s)) for s in batch]


def _batched(it, n):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def process_ordered(samples: Iterator[SourceSample], params: Params, workers: int, batch_size: int = 16):
    """(sample, result) in input order; bounded memory (a few batches per worker in flight)."""
    batches = io.ordered_map(_process_pair, _batched(samples, batch_size), workers, initializer=_init_worker,
                             initargs=(params,))
    try:
        for pairs in batches:
            yield from pairs
    finally:
        batches.close()  # stops the worker pool if the caller left early


def convert(*, out_dir, params: Params, json_files=(), image_root=None, parquet_globs=(), wds_globs=(),
            id_column="id", image_column="image", caption_column="caption", prefix="raw",
            records_per_shard=10000, max_reject_fraction=0.05, abort_min_samples=1000, workers=1,
            log_every=10000) -> dict:
    """Runs the conversion; returns the manifest. Raises ConvertError (manifest written) on abort."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    io.refuse_existing(out, prefix, ConvertError)
    if json_files and not image_root:
        raise ConvertError("--json needs --image-root")
    if not (json_files or parquet_globs or wds_globs):
        raise ConvertError("no input: give --json, --parquet and/or --wds")
    if not 0 <= max_reject_fraction <= 1:
        raise ConvertError(f"--max-reject-fraction {max_reject_fraction} is not in [0, 1]")

    inputs, sources = [], []
    for jf in json_files:
        if not os.path.isfile(jf):
            raise ConvertError(f"no JSON file {jf}")
        inputs.append({"format": "llava_json", "path": str(jf), "image_root": str(image_root),
                       "sha256": io.sha256_file(jf)})
        sources.append(lambda jf=jf: iter_llava_json(str(jf), str(image_root)))
    ignored = collections.Counter()
    for fmt, globs in (("parquet", parquet_globs), ("webdataset", wds_globs)):
        for pattern in globs:
            files, base = glob_files(pattern)
            inputs.append({"format": fmt, "glob": pattern, "base": base,
                           "files": [{"path": os.path.relpath(f, base), "bytes": os.path.getsize(f)} for f in files]})
            for f in files:
                if fmt == "parquet":
                    sources.append(lambda f=f, base=base: iter_parquet(
                        f, base, id_column=id_column, image_column=image_column, caption_column=caption_column,
                        prompt=params.caption_prompt))
                else:
                    sources.append(lambda f=f, base=base: iter_wds(f, base, prompt=params.caption_prompt,
                                                                   ignored=ignored))

    def all_samples():
        for make in sources:
            yield from make()

    tok_dir = Path(params.tokenizer)
    tok_json = tok_dir / "tokenizer.json"
    manifest = {
        "format": MANIFEST_FORMAT, "schema_version": schema.RAW_VERSION, "status": "running",
        "inputs": inputs,
        "parameters": {**asdict(params), "tokenizer_sha256": io.sha256_file(tok_json) if tok_json.exists() else None,
                       "prefix": prefix, "records_per_shard": records_per_shard,
                       "max_reject_fraction": max_reject_fraction, "abort_min_samples": abort_min_samples,
                       "id_column": id_column, "image_column": image_column, "caption_column": caption_column},
        "seed": None,  # conversion is deterministic and uses no randomness
        "reject_reasons": list(REJECT_REASONS),
    }
    counts = {"seen": 0, "written": 0, "rejected": 0, "tokens": 0, "supervised_tokens": 0, "images": 0,
              "patches": 0}
    seen_ids: set[bytes] = set()
    writer = io.ShardWriter(out, prefix, records_per_shard)
    abort_msg = None
    rejects = io.RejectLog(out / io.REJECTS_FILE)
    results = process_ordered(all_samples(), params, workers)
    try:
        with rejects:
            for s, result in results:
                counts["seen"] += 1
                id_hash = hashlib.blake2b(s.sample_id.encode("utf-8"), digest_size=12).digest()
                if result[0] == "ok" and id_hash in seen_ids:
                    result = ("reject", "duplicate_id", f"id {s.sample_id!r} seen before")
                if result[0] == "ok":
                    seen_ids.add(id_hash)
                    writer.write(result[1])
                    counts["written"] += 1
                    for k, v in result[2].items():
                        counts[k] += v
                else:
                    _, reason, detail = result
                    counts["rejected"] += 1
                    rejects.add(reason, id=s.sample_id, detail=detail, meta=s.meta)
                if log_every and counts["seen"] % log_every == 0:
                    print(f"convert: {counts['seen']} seen, {counts['written']} written, {counts['rejected']} "
                          f"rejected {rejects.by_reason()}", file=sys.stderr, flush=True)
                if (counts["seen"] >= abort_min_samples
                        and counts["rejected"] > max_reject_fraction * counts["seen"]):
                    abort_msg = _abort_message(counts, rejects.by_reason(), max_reject_fraction)
                    break
        if abort_msg is None and counts["seen"] and counts["rejected"] > max_reject_fraction * counts["seen"]:
            abort_msg = _abort_message(counts, rejects.by_reason(), max_reject_fraction)
        if abort_msg is None and counts["seen"] == 0:
            abort_msg = "the inputs hold no samples"
    except ConvertError as e:
        abort_msg = str(e)
    finally:
        results.close()  # stops the worker pool if we left early
        manifest["shards"] = writer.finish()
        manifest["counts"] = counts
        manifest["rejected_by_reason"] = rejects.by_reason()
        manifest["ignored_tar_members"] = dict(sorted(ignored.items()))
        manifest["rejects_file"] = io.REJECTS_FILE
        manifest["status"] = "aborted" if abort_msg else "complete"
        if abort_msg:
            manifest["abort_reason"] = abort_msg
        io.write_json(out / io.MANIFEST, manifest)
    if abort_msg:
        raise ConvertError(abort_msg)
    return manifest


def _abort_message(counts, by_reason, limit) -> str:
    frac = counts["rejected"] / counts["seen"]
    return (f"aborting: {counts['rejected']} of {counts['seen']} samples rejected ({frac:.1%} > "
            f"{limit:.1%}); by reason {dict(sorted(by_reason.items()))}; see rejects.jsonl")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ovjax convert", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--json", action="append", default=[], metavar="FILE", help="LLaVA JSON / JSONL (repeatable)")
    ap.add_argument("--image-root", help="folder the JSON image paths are relative to")
    ap.add_argument("--parquet", action="append", default=[], metavar="GLOB", help="parquet glob (repeatable)")
    ap.add_argument("--wds", action="append", default=[], metavar="GLOB", help="webdataset tar glob (repeatable)")
    ap.add_argument("--id-column", default="id")
    ap.add_argument("--image-column", default="image")
    ap.add_argument("--caption-column", default="caption")
    ap.add_argument("--caption-prompt", default="", help="user text after <image> for caption samples")
    ap.add_argument("--default-system", default=chat.DEFAULT_SYSTEM)
    ap.add_argument("--tokenizer", required=True, metavar="DIR", help="HF tokenizer directory")
    ap.add_argument("--out", required=True, metavar="DIR", help="output folder (must not hold shards yet)")
    ap.add_argument("--prefix", default="raw")
    ap.add_argument("--seq-len", type=int, default=8192, help="reject samples with more tokens")
    ap.add_argument("--min-pixels", type=int, default=images.MIN_PIXELS)
    ap.add_argument("--max-pixels", type=int, default=images.MAX_PIXELS)
    ap.add_argument("--max-side", type=int, default=0,
                    help="scale images whose longest side is over this many pixels down to it before "
                         "smart_resize, stored as PNG (0 = no cap; the upstream's stage 2 uses 1000)")
    ap.add_argument("--records-per-shard", type=int, default=10000)
    ap.add_argument("--max-reject-fraction", type=float, default=0.05)
    ap.add_argument("--abort-min-samples", type=int, default=1000,
                    help="samples seen before the reject fraction is checked (it is always checked at the end)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes for the per-sample work (1 = in process); output does not depend on it")
    ap.add_argument("--log-every", type=int, default=10000)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.records_per_shard < 1 or args.seq_len < 1 or args.max_side < 0:
        print("convert: --records-per-shard and --seq-len must be positive, --max-side >= 0", file=sys.stderr)
        return 2
    params = Params(tokenizer=args.tokenizer, seq_len=args.seq_len, min_pixels=args.min_pixels,
                    max_pixels=args.max_pixels, caption_prompt=args.caption_prompt,
                    default_system=args.default_system, max_side=args.max_side)
    try:
        m = convert(out_dir=args.out, params=params, json_files=args.json, image_root=args.image_root,
                    parquet_globs=args.parquet, wds_globs=args.wds, id_column=args.id_column,
                    image_column=args.image_column, caption_column=args.caption_column, prefix=args.prefix,
                    records_per_shard=args.records_per_shard, max_reject_fraction=args.max_reject_fraction,
                    abort_min_samples=args.abort_min_samples, workers=args.workers, log_every=args.log_every)
    except ConvertError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    c = m["counts"]
    print(f"convert: {c['seen']} seen, {c['written']} written in {len(m['shards'])} shard(s), {c['rejected']} "
          f"rejected {m['rejected_by_reason']} -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
