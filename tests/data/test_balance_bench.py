"""Smoke run of the balance benchmark (tiny sizes): it runs, checks retrieval against numpy, writes its JSON."""

import json

from ovjax.bench import balance as bench


def test_smoke(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    e, r = res["embedding"], res["retrieval"]
    assert e["images"] == 48 and e["images_per_s"] > 0 and e["encoder_only_images_per_s"] > 0
    assert (r["concepts"], r["images"], r["dim"]) == (3000, 700, 32)
    assert r["checked_rows_equal_numpy"] is True and r["timed_images"] == 700 - 256
    assert r["images_per_s"] > 0 and r["peak_rss_gib"] >= r["peak_rss_gib_inputs"] > 0
    assert len(res["load_before"]) == 3 and "images/s" in capsys.readouterr().out
