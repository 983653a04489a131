"""ovjax.data.selection: round trip and its errors; pack reading exactly the picked records."""

from __future__ import annotations

import collections
import hashlib
import json
import os

import numpy as np
import pytest

from ovjax.data import pack, schema, selection
from tests.data.test_pack import BUDGETS, raw_sample, read_packed, sha_files, write_raw_set


def raw_dir(path, prefix: str, n: int, n_shards: int) -> str:
    """A raw set of n text samples with ids prefix0..prefix{n-1}, round-robin over shards."""
    rng = np.random.default_rng(len(prefix))
    recs = [schema.dumps(raw_sample(f"{prefix}{k}", int(rng.integers(3, 30)), rng=rng)) for k in range(n)]
    return write_raw_set(path, recs, n_shards)


@pytest.fixture()
def sources(tmp_path):
    return [raw_dir(tmp_path / "a", "a", 10, 2), raw_dir(tmp_path / "b", "b", 7, 1)]


PICKS = [(1, 0, 3), (0, 1, 4), (0, 0, 0), (1, 0, 3), (0, 1, 0)]  # (source, shard, record); (1,0,3) twice


def test_round_trip(sources, tmp_path):
    header = selection.write_selection(tmp_path / "sel.json", sources, PICKS, {"step": "test", "seed": 3})
    assert header["num_picks"] == 5 and selection.is_selection(tmp_path / "sel.json")
    assert not selection.is_selection(os.path.join(sources[0], "manifest.json"))
    sel = selection.read_selection(tmp_path / "sel.json")
    assert sel.picks.dtype == np.int64 and sel.picks.tolist() == [list(p) for p in PICKS]
    assert sel.producer == {"step": "test", "seed": 3}
    assert [s["dir"] for s in sel.sources] == [os.path.abspath(d) for d in sources]
    assert [len(p) for p in sel.shard_paths] == [2, 1]
    assert sel.shard_paths[0][1] == os.path.join(os.path.abspath(sources[0]), "raw-00001-of-00002.array_record")


def test_tampered_picks_file(sources, tmp_path):
    selection.write_selection(tmp_path / "sel.json", sources, PICKS, {})
    np.save(tmp_path / "sel.picks.npy", np.asarray(PICKS[:4], np.int64), allow_pickle=False)
    with pytest.raises(selection.SelectionError, match=r"sel\.picks\.npy does not match the sha256 in .*sel\.json"):
        selection.read_selection(tmp_path / "sel.json")


def test_changed_source_manifest(sources, tmp_path):
    selection.write_selection(tmp_path / "sel.json", sources, PICKS, {})
    m = json.load(open(os.path.join(sources[1], "manifest.json")))
    m["note"] = "edited"
    json.dump(m, open(os.path.join(sources[1], "manifest.json"), "w"))
    with pytest.raises(selection.SelectionError, match=r"source 1 \(.*b\) changed since the selection was made"):
        selection.read_selection(tmp_path / "sel.json")


@pytest.mark.parametrize("pick, message", [
    ((0, 0, 5), r"source 0 shard 0 holds 5 records, a pick names record 5"),
    ((0, 2, 0), r"source 0 has 2 shard\(s\), a pick names shard 2"),
    ((2, 0, 0), r"pick names source 2, only 2 source\(s\) listed"),
    ((0, -1, 0), r"negative index in picks"),
])
def test_out_of_range_pick(sources, tmp_path, pick, message):
    with pytest.raises(selection.SelectionError, match=message):
        selection.write_selection(tmp_path / "sel.json", sources, PICKS + [pick], {})
    assert not (tmp_path / "sel.json").exists()
    # a valid selection whose picks file is replaced by one with the bad pick (and a matching sha256)
    selection.write_selection(tmp_path / "ok.json", sources, PICKS, {})
    picks_path = tmp_path / "ok.picks.npy"
    np.save(picks_path, np.asarray(PICKS + [pick], np.int64), allow_pickle=False)
    header = json.load(open(tmp_path / "ok.json"))
    header.update(picks_sha256=hashlib.sha256(picks_path.read_bytes()).hexdigest(), num_picks=len(PICKS) + 1)
    json.dump(header, open(tmp_path / "ok.json", "w"))
    with pytest.raises(selection.SelectionError, match=message):
        selection.read_selection(tmp_path / "ok.json")


# ----------------------------------------------------------------------------------------------- pack


def test_pack_reads_exactly_the_picks(sources, tmp_path):
    sel_path = tmp_path / "sel.json"
    selection.write_selection(sel_path, sources, PICKS, {"step": "test"})
    m = pack.pack(str(sel_path), str(tmp_path / "packed"), BUDGETS, seed=0)
    bins = read_packed(tmp_path / "packed")
    packed = collections.Counter(s["id"] for b in bins for s in b["samples"])
    # source a: shard 0 holds records 0, 2, 4, ... and shard 1 records 1, 3, ... (round-robin)
    assert packed == collections.Counter({"b3": 2, "a9": 1, "a0": 1, "a1": 1})
    assert m["counts"]["samples_in"] == 5 and m["counts"]["samples_packed"] == 5
    assert m["inputs"]["selection"] == str(sel_path.resolve())
    assert m["inputs"]["selection_sha256"] == hashlib.sha256(sel_path.read_bytes()).hexdigest()


def test_pack_of_a_selection_of_everything_in_order_equals_pack_of_the_directory(sources, tmp_path):
    meta = json.load(open(os.path.join(sources[0], "manifest.json")))
    picks = [(0, s, r) for s, sh in enumerate(meta["shards"]) for r in range(sh["records"])]
    selection.write_selection(tmp_path / "all.json", sources[:1], picks, {})
    pack.pack(sources[0], str(tmp_path / "from_dir"), BUDGETS, seed=5, num_shards=2)
    pack.pack(str(tmp_path / "all.json"), str(tmp_path / "from_sel"), BUDGETS, seed=5, num_shards=2)
    assert sha_files(tmp_path / "from_sel") == sha_files(tmp_path / "from_dir")
    reversed_sel = tmp_path / "reversed.json"  # same records, other order: another plan input order
    selection.write_selection(reversed_sel, sources[:1], picks[::-1], {})
    pack.pack(str(reversed_sel), str(tmp_path / "reversed"), BUDGETS, seed=5, num_shards=2)
    got = collections.Counter(s["id"] for b in read_packed(tmp_path / "reversed") for s in b["samples"])
    assert got == collections.Counter(f"a{k}" for k in range(10))


def test_pack_cli_reports_a_bad_selection(sources, tmp_path, capsys):
    selection.write_selection(tmp_path / "sel.json", sources, PICKS, {})
    (tmp_path / "sel.picks.npy").write_bytes(b"garbage")
    assert pack.main(["--input", str(tmp_path / "sel.json"), "--out", str(tmp_path / "p")]) == 2
    assert "does not match the sha256" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
