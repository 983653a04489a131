"""The packing benchmark (ovjax/bench/pack.py): like-with-like rows and its packed-row iterators."""

import json

import numpy as np

from ovjax.data import pack


def test_bench_smoke(tmp_path):
    from ovjax.bench import pack as bench

    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    names = {r["packer"] for r in res["packing"]}
    assert {"ovjax", "grain FirstFitPack", "grain BestFitPack"} <= names
    for r in res["packing"]:
        assert r["bins"] >= r["lower_bound"] > 0
    assert res["loader"]["samples_per_s"] > 0
    # like with like: every packer of a budget set packs the same records, scored by fill, not padding ratios
    by_budget = {}
    for r in res["packing"]:
        by_budget.setdefault(r["budgets"], []).append(r)
        assert "padding_compression" not in r
        assert 0 < r["fill"] <= 1 and r["seconds_min"] <= r["seconds"] <= r["seconds_max"]
    assert set(by_budget) == {"tokens", "tokens+patches"}
    for rows in by_budget.values():
        assert sorted(r["packer"] for r in rows) == sorted(bench.PACKERS)
        assert len({(r["items"], r["lower_bound"]) for r in rows}) == 1
        fills = {r["packer"]: r["fill"] for r in rows}
        tokens = rows[0]["fill"] * rows[0]["bins"]  # the same token total behind every row
        for r in rows:
            assert abs(r["fill"] * r["bins"] - tokens) < 1e-6 * tokens
        assert fills["ovjax"] >= fills["grain FirstFitPack"]


def test_bench_iterators_pack_identical_rows():
    from ovjax.bench import pack as bench

    records = bench.make_records({"tokens": np.array([5, 3, 4, 2]), "patches": np.array([8, 1, 2, 6])})
    caps = {"tokens": 8, "patches": 10}
    budgets = pack.Budgets(8, max_patches=10, max_segments=3, max_images=3)
    for rows in (bench.ovjax_packed_rows(records, caps, budgets, {}),
                 bench.grain_packed_rows(records, caps, 3, 4, best_fit=True)):
        rows = list(rows)
        assert all(r["tokens"].shape == (8,) and r["patches"].shape == (10,) for r in rows)
        assert sum(int(np.count_nonzero(r["tokens_segment_ids"])) for r in rows) == 14
        assert sum(int(np.count_nonzero(r["patches_segment_ids"])) for r in rows) == 17
        # positions restart at 0 in every segment; values are the record's own (1..n)
        for r in rows:
            seg, pos, val = r["tokens_segment_ids"], r["tokens_positions"], r["tokens"]
            for s in set(seg.tolist()) - {0}:
                n = int((seg == s).sum())
                assert pos[seg == s].tolist() == list(range(n)) and val[seg == s].tolist() == list(range(1, n + 1))
