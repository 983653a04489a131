"""ovjax.data.pack: accounting, budgets, determinism over worker counts, lengths-only plans."""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import math
import os

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from ovjax.data import pack, schema


# ----------------------------------------------------------------------------------------------- helpers
# (test_loader imports these)


def write_raw_set(out_dir, records: list[bytes], n_shards: int) -> str:
    """Write encoded raw records round-robin into shards + a convert-style manifest; returns out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    shards = []
    for s in range(n_shards):
        name = f"raw-{s:05d}-of-{n_shards:05d}.array_record"
        w = ArrayRecordWriter(os.path.join(out_dir, name), "group_size:1")
        mine = records[s::n_shards]
        for r in mine:
            w.write(r)
        w.close()
        shards.append({"file": name, "records": len(mine)})
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump({"format": "ovjax-raw", "status": "complete", "shards": shards}, f)
    return str(out_dir)


def raw_sample(sid: str, n_tokens: int, grids=(), rng=None, image_bytes=None) -> dict:
    rng = rng or np.random.default_rng(len(sid))
    imgs = list(image_bytes) if image_bytes is not None else [f"img-{sid}-{k}".encode() for k in range(len(grids))]
    return schema.make_raw(sid, rng.integers(0, 1000, n_tokens), rng.random(n_tokens) < 0.5, imgs,
                           np.asarray(grids, np.int32).reshape(-1, 3))


def read_packed(out_dir) -> list[dict]:
    """All packed records of a packed set, in shard order."""
    with open(os.path.join(out_dir, "manifest.json")) as f:
        manifest = json.load(f)
    out = []
    for s in manifest["shards"]:
        r = ArrayRecordReader(os.path.join(out_dir, s["file"]))
        out += [schema.validate_packed(schema.loads(b)) for b in r.read_all()]
        r.close()
    return out


def sha_files(out_dir) -> dict[str, str]:
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(out_dir, "*.array_record")))}


BUDGETS = pack.Budgets(seq_len=64, max_patches=48, max_segments=4, max_images=3)


def mixed_records(n: int = 150, seed: int = 0) -> tuple[list[bytes], dict[str, str]]:
    """Random samples plus planted rejects; returns (records, expected reject reason by id)."""
    rng = np.random.default_rng(seed)
    recs, expected = [], {}
    for k in range(n):
        n_img = int(rng.integers(0, 3))
        grids = [(1, 2 * int(rng.integers(1, 3)), 2 * int(rng.integers(1, 3))) for _ in range(n_img)]
        recs.append(schema.dumps(raw_sample(f"ok{k}", int(rng.integers(1, 40)), grids, rng)))
    planted = [
        (raw_sample("long", 65), "too_many_tokens"),
        (raw_sample("exact", 64), None),  # exactly seq_len fits
        (raw_sample("wide", 10, [(1, 4, 8), (1, 4, 6)]), "too_many_patches"),  # 32 + 24 > 48
        (raw_sample("many", 10, [(1, 2, 2)] * 4), "too_many_images"),
        (raw_sample("empty", 0), "empty"),
        # an id of an earlier sample: convert rejects duplicates (tests/data/test_convert.py); pack packs
        # what it is given, so a repeat (a selection picking a sample twice) is packed twice
        (raw_sample("ok3", 5), None),
    ]
    for rec, reason in planted:
        recs.insert(int(rng.integers(0, len(recs))), schema.dumps(rec))
        if reason:
            expected.setdefault(rec["id"], reason)
    recs.insert(7, b"\x93not a record")
    return recs, expected


# ----------------------------------------------------------------------------------------------- full pack


def test_pack_accounts_for_every_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(pack, "_CHUNK", 32)
    recs, expected_rejects = mixed_records()
    raw = write_raw_set(tmp_path / "raw", recs, n_shards=3)
    manifest = pack.pack(raw, str(tmp_path / "packed"), BUDGETS, seed=0, workers=1, bins_per_shard=16)

    # the invalid record is named by its shard and index: record 7 went to shard 7 % 3 = 1 as its 3rd record
    expected_rejects["raw-00001-of-00003.array_record#2"] = "invalid_record"
    rejects = [json.loads(line) for line in open(tmp_path / "packed" / "rejects.jsonl")]
    assert {r["id"]: r["reason"] for r in rejects} == expected_rejects
    assert len(rejects) == len(expected_rejects)

    bins = read_packed(tmp_path / "packed")
    packed_ids = collections.Counter(s["id"] for b in bins for s in b["samples"])
    input_ids = collections.Counter()
    for r in recs:
        try:
            input_ids[schema.loads(r)["id"]] += 1
        except schema.RecordError:
            input_ids["raw-00001-of-00003.array_record#2"] += 1
    assert packed_ids + collections.Counter(r["id"] for r in rejects) == input_ids
    others = packed_ids.copy()
    assert others.pop("ok3") == 2 and max(others.values()) == 1

    originals = {}
    for r in recs:
        try:
            rec = schema.loads(r)
        except schema.RecordError:
            continue
        originals.setdefault(rec["id"], []).append(rec)
    for b in bins:
        samples = b["samples"]
        assert 1 <= len(samples) <= 4
        assert sum(len(s["tokens"]) for s in samples) <= 64
        assert sum(schema.num_patches(s) for s in samples) <= 48
        assert sum(len(s["images"]) for s in samples) <= 3
        for s in samples:  # the sample travels unchanged
            assert any(np.array_equal(s["tokens"], o["tokens"]) and np.array_equal(s["loss_mask"], o["loss_mask"])
                       and s["images"] == o["images"] and np.array_equal(s["grids"], o["grids"])
                       for o in originals[s["id"]])

    c = manifest["counts"]
    assert c["samples_in"] == len(recs) and c["samples_rejected"] == len(expected_rejects)
    assert c["samples_packed"] == sum(packed_ids.values()) and c["bins"] == len(bins)
    assert manifest["rejected_by_reason"] == dict(collections.Counter(expected_rejects.values()))
    st = manifest["stats"]
    tokens = sum(len(s["tokens"]) for b in bins for s in b["samples"])
    assert st["tokens"] == tokens and st["lower_bound_bins"]["tokens"] == math.ceil(tokens / 64)
    assert st["token_fill"] == pytest.approx(tokens / (64 * len(bins)))
    n = c["samples_packed"]
    assert st["padding_compression"] == pytest.approx((n * 64 - tokens) / (len(bins) * 64 - tokens))
    per_shard = [s["records"] for s in manifest["shards"]]
    assert len(per_shard) == math.ceil(len(bins) / 16) and sum(per_shard) == len(bins) and max(per_shard) <= 16
    assert sha_files(tmp_path / "packed") == {s["file"]: s["sha256"] for s in manifest["shards"]}


def test_pack_is_byte_identical_for_1_2_4_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(pack, "_CHUNK", 16)  # several length tasks per shard
    recs, _ = mixed_records(120, seed=1)
    raw = write_raw_set(tmp_path / "raw", recs, n_shards=2)
    hashes = {}
    for workers in (1, 2, 4):
        out = tmp_path / f"w{workers}"
        m = pack.pack(raw, str(out), BUDGETS, seed=7, workers=workers, num_shards=3)
        hashes[workers] = sha_files(out)
        assert len(hashes[workers]) == 3
        m.pop("seconds")
        m["inputs"].pop("spec")
        if workers == 1:
            ref = m
        else:
            assert m == ref
    assert hashes[1] == hashes[2] == hashes[4]
    other = tmp_path / "seed8"
    pack.pack(raw, str(other), BUDGETS, seed=8, workers=1, num_shards=3)
    assert sha_files(other) != hashes[1]


def test_pack_refuses_an_existing_output_and_an_incomplete_input(tmp_path):
    recs, _ = mixed_records(10)
    raw = write_raw_set(tmp_path / "raw", recs, 1)
    pack.pack(raw, str(tmp_path / "p"), BUDGETS)
    with pytest.raises(pack.PackError, match="already holds"):
        pack.pack(raw, str(tmp_path / "p"), BUDGETS)
    m = json.load(open(tmp_path / "raw" / "manifest.json"))
    m["status"] = "aborted"
    json.dump(m, open(tmp_path / "raw" / "manifest.json", "w"))
    assert pack.main(["--input", raw, "--out", str(tmp_path / "q")]) == 2


# ----------------------------------------------------------------------------------------------- plan only


LENGTHS = """\
a:5
b:7
c:3
this line has no separator
d:x
e:0
:4
a:2
long:11
path/with:colon:4
f:10
g:1
"""


def test_plan_only_mode(tmp_path, capsys):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text(LENGTHS)
    out = tmp_path / "plan.jsonl"
    assert pack.main(["--plan-only", "--lengths", str(lengths), "--seq-len", "10", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    for lineno in (4, 5, 6, 7, 8):
        assert f"lengths.txt:{lineno}:" in err
    assert not out.exists()

    assert pack.main(["--plan-only", "--lengths", str(lengths), "--seq-len", "10", "--out", str(out),
                      "--skip-bad-lines"]) == 0
    bins = [json.loads(line) for line in out.read_text().splitlines()]
    sizes = {"a": 5, "b": 7, "c": 3, "path/with:colon": 4, "f": 10, "g": 1}
    names = [n for b in bins for n in b["names"]]
    assert sorted(names) == sorted(sizes)
    for b in bins:
        assert b["tokens"] == sum(sizes[n] for n in b["names"]) <= 10
    assert len(bins) == 3  # 30 tokens in bins of 10: the lower bound
    summary = json.loads((tmp_path / "plan.jsonl.manifest.json").read_text())
    assert [b["line"] for b in summary["bad_lines"]] == [4, 5, 6, 7, 8]
    assert summary["rejected"] == [{"name": "long", "length": 11, "reason": "too_many_tokens"}]
    assert summary["samples_in"] == 7 and summary["samples_packed"] == 6


def test_cli_help():
    with pytest.raises(SystemExit) as e:
        pack.main(["--help"])
    assert e.value.code == 0
