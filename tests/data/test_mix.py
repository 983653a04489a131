"""ovjax.data.mix: weighted mixtures -> selection manifests; proportions, determinism, pack of a mixture."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from ovjax.data import mix, pack
from tests.data.test_pack import BUDGETS, read_packed, sha_files
from tests.data.test_selection import raw_dir


@pytest.fixture()
def sources(tmp_path):
    return [raw_dir(tmp_path / "a", "a", 40, 2), raw_dir(tmp_path / "b", "b", 30, 3)]


def test_three_to_one_mixture_packs_in_proportion_and_reruns_identically(sources, tmp_path):
    spec = [(sources[0], 3.0), (sources[1], 1.0)]
    header = mix.mix(spec, str(tmp_path / "m1" / "mix.json"), seed=7, target=400)
    picks = np.load(tmp_path / "m1" / "mix.picks.npy", allow_pickle=False)
    assert picks.shape == (400, 3) and collections.Counter(picks[:, 0].tolist()) == {0: 300, 1: 100}
    assert [(s["picks"], s["records"], s["realised_share"]) for s in header["producer"]["sources"]] == [
        (300, 40, 0.75), (100, 30, 0.25)]
    # every record of a source appears floor or ceil(picks / records) times: whole passes before repeats
    for s, (n_picks, n_rec) in enumerate(((300, 40), (100, 30))):
        reps = collections.Counter(map(tuple, picks[picks[:, 0] == s][:, 1:].tolist()))
        assert len(reps) == n_rec and set(reps.values()) <= {n_picks // n_rec, -(-n_picks // n_rec)}
    assert not (np.diff(picks[:, 0]) == 0).all()  # interleaved, not one source after the other

    p1 = pack.pack(str(tmp_path / "m1" / "mix.json"), str(tmp_path / "p1"), BUDGETS, seed=3, workers=1)
    ids = [s["id"] for b in read_packed(tmp_path / "p1") for s in b["samples"]]
    assert p1["counts"]["samples_packed"] == len(ids) == 400
    share_a = sum(i.startswith("a") for i in ids) / len(ids)
    assert abs(share_a - 0.75) <= 0.01

    # rerun: same manifest, same picks, and the same packed shards with another worker count
    mix.mix(spec, str(tmp_path / "m2" / "mix.json"), seed=7, target=400)
    assert (tmp_path / "m2" / "mix.picks.npy").read_bytes() == (tmp_path / "m1" / "mix.picks.npy").read_bytes()
    assert json.loads((tmp_path / "m2" / "mix.json").read_text()) == json.loads(
        (tmp_path / "m1" / "mix.json").read_text())
    pack.pack(str(tmp_path / "m2" / "mix.json"), str(tmp_path / "p2"), BUDGETS, seed=3, workers=2)
    assert sha_files(tmp_path / "p2") == sha_files(tmp_path / "p1") and len(sha_files(tmp_path / "p1")) >= 1
    # another seed: other picks
    mix.mix(spec, str(tmp_path / "m3" / "mix.json"), seed=8, target=400)
    assert (tmp_path / "m3" / "mix.picks.npy").read_bytes() != (tmp_path / "m1" / "mix.picks.npy").read_bytes()


def test_epochs_and_subsets(sources, tmp_path):
    h = mix.mix([(sources[0], 1.0), (sources[1], 1.0)], str(tmp_path / "e.json"), seed=0, epochs=2)
    assert h["num_picks"] == 140 and [s["picks"] for s in h["producer"]["sources"]] == [70, 70]
    h = mix.mix([(sources[0], 2.0), (sources[1], 1.0)], str(tmp_path / "t.json"), seed=0, target=31)
    assert [s["picks"] for s in h["producer"]["sources"]] == [21, 10]  # 20.67 / 10.33: largest remainder
    picks = np.load(tmp_path / "t.picks.npy", allow_pickle=False)
    assert len(set(map(tuple, picks[picks[:, 0] == 0].tolist()))) == 21  # a subset: no repeats


def test_shares_add_up():
    assert mix.shares(10, [1, 1, 1]).tolist() == [4, 3, 3]
    assert mix.shares(7, [3, 1]).tolist() == [5, 2]


def test_cli_and_errors(sources, tmp_path, capsys):
    out = tmp_path / "c.json"
    assert mix.main(["--source", f"{sources[0]}:3", "--source", f"{sources[1]}:1", "--target", "8",
                     "--seed", "1", "--out", str(out)]) == 0
    assert "8 picks" in capsys.readouterr().err and out.exists()
    assert mix.main(["--source", f"{sources[0]}:-1", "--target", "8", "--out", str(tmp_path / "x.json")]) == 2
    assert "positive finite weight" in capsys.readouterr().err
    assert mix.main(["--source", f"{sources[0]}:1", "--source", f"{sources[0]}:2", "--target", "8",
                     "--out", str(tmp_path / "x.json")]) == 2
    assert "listed twice" in capsys.readouterr().err
    assert mix.main(["--source", f"{tmp_path}:1", "--target", "8", "--out", str(tmp_path / "x.json")]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mix.main(["--source", f"{sources[0]}:1", "--target", "8", "--epochs", "1", "--out", str(out)])
    assert not (tmp_path / "x.json").exists()
