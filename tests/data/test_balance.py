"""balance end to end: a tiny random transformers CLIPModel on synthetic images with a known skew."""

import json

import numpy as np
import pytest

from ovjax.data import balance, clip_encoder, concept_stats, convert, embed_cache, selection, synthetic
from tests.data._balance_inputs import make_tiny_clip
from tests.data._make_inputs import make_tokenizer, write_parquet

N_SAMPLES = 120
DOMINANT = (48, 30)  # samples showing dominant scene 0 / 1 (identical images); the rest are all different
TOP_K = 2


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("balance")
    rng = np.random.default_rng(0)
    dominant = [synthetic.random_scene(rng, colour="red", shape="circle", count=3),
                synthetic.random_scene(rng, colour="blue", shape="square", count=1, quadrant=2)]
    rows = []
    for i in range(N_SAMPLES):
        which = 0 if i < DOMINANT[0] else 1 if i < sum(DOMINANT) else None
        scene = dominant[which] if which is not None else synthetic.random_scene(rng)
        rows.append({"id": f"s{i:04d}", "image": synthetic.png_bytes(synthetic.render(scene)),
                     "caption": synthetic.caption(scene)})
    order = rng.permutation(N_SAMPLES)  # dominant scenes spread over shards and chunks
    write_parquet(root / "in" / "data.parquet", [rows[i] for i in order], image_as_struct=False)
    tok = make_tokenizer(root / "tok")
    raw = root / "raw"
    convert.convert(out_dir=raw, params=convert.Params(tokenizer=str(tok), seq_len=512),
                    parquet_globs=[str(root / "in" / "*.parquet")], records_per_shard=50, workers=1)
    concepts = root / "concepts.txt"
    words = [f"{n} {c} {s}" for n in synthetic.COUNT_WORDS for c in synthetic.COLOURS for s in synthetic.SHAPES]
    concepts.write_text("\n".join(words) + "\n")
    clip = make_tiny_clip(root / "clip", weight_scale=6.0)
    return {"root": root, "raw": raw, "concepts": concepts, "clip": clip, "tok": tok}


@pytest.fixture(scope="module")
def encoder(inputs):
    return clip_encoder.ClipEncoder(inputs["clip"], batch_size=16, mesh=balance.default_mesh())


def run(inputs, encoder, out, **kw):
    args = dict(top_k=TOP_K, target=200, seed=3, chunk_size=32, image_chunk=16, concept_chunk=32, progress=False)
    args.update(kw)
    return balance.balance([str(inputs["raw"])], str(inputs["concepts"]), str(inputs["clip"]), str(out),
                           encoder=encoder, **args)


@pytest.fixture(scope="module")
def first(inputs, encoder):
    out = inputs["root"] / "sel" / "a.json"
    return out, run(inputs, encoder, out)


def test_skew_flattens(first):
    out, report = first
    b, a = report["before"], report["after"]
    print(json.dumps({"before": b, "after": a}, indent=1))
    assert report["samples"] == N_SAMPLES and report["samples_without_images"] == 0
    assert b["concepts"] == 72 and b["occurrences"] == N_SAMPLES * TOP_K and a["occurrences"] == 200 * TOP_K
    # the known skew: scene 0's identical images (40% of the samples) put both their concepts in 48 of the
    # 240 top-K slots, so the top 1% (one concept) holds at least 48/240 of the occurrences ...
    assert b["top1pct_share"] >= DOMINANT[0] / (N_SAMPLES * TOP_K)
    # ... and balancing flattens it by clear margins: the top share drops by >= 40%, entropy rises >= 0.5 nats
    assert a["top1pct_share"] <= 0.6 * b["top1pct_share"]
    assert a["entropy_nats"] >= b["entropy_nats"] + 0.5
    assert a["concepts_covered"] == b["concepts_covered"]  # no concept is lost at this target
    assert (out.parent / "a.report.png").stat().st_size > 1000
    assert json.loads((out.parent / "a.report.json").read_text())["after"] == a


def test_selection_is_valid_and_deterministic(inputs, encoder, first):
    out, report = first
    sel = selection.read_selection(out)
    assert sel.picks.shape == (200, 3) and sel.producer["seed"] == 3 and sel.producer["top_k"] == TOP_K
    again = inputs["root"] / "sel2" / "a.json"  # fresh cache: everything recomputed
    run(inputs, encoder, again)
    assert json.loads(again.read_text()) == json.loads(out.read_text())
    assert again.with_name("a.picks.npy").read_bytes() == out.with_name("a.picks.npy").read_bytes()
    other = inputs["root"] / "sel" / "seed4.json"  # same cache, other seed: other picks
    run(inputs, encoder, other, seed=4, cache_dir=str(out.with_name("a.cache")))
    assert not np.array_equal(selection.read_selection(other).picks, sel.picks)


def test_without_replacement(inputs, encoder, first):
    out, _ = first
    sel_path = inputs["root"] / "sel" / "norep.json"
    report = run(inputs, encoder, sel_path, target=60, replace=False, cache_dir=str(out.with_name("a.cache")))
    picks = selection.read_selection(sel_path).picks
    assert len(np.unique(picks, axis=0)) == 60 == report["distinct_samples_picked"]
    assert report["after"]["top1pct_share"] < report["before"]["top1pct_share"]
    with pytest.raises(concept_stats.BalanceError, match="exceeds the 120 samples"):
        run(inputs, encoder, sel_path.with_name("x.json"), target=121, replace=False,
            cache_dir=str(out.with_name("a.cache")))


class Interrupt(Exception):
    pass


class CountingEncoder:
    """Wraps the encoder: counts images embedded and raises after `fail_after` image batches (a kill)."""

    def __init__(self, inner, fail_after=None):
        self.inner, self.fail_after, self.calls, self.images = inner, fail_after, 0, 0
        self.dim = inner.dim

    def embed_texts(self, texts):
        return self.inner.embed_texts(texts)

    def embed_images(self, data):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise Interrupt("killed")
        self.calls += 1
        self.images += len(data)
        return self.inner.embed_images(data)


def test_interrupted_run_resumes_from_cached_chunks(inputs, encoder, first):
    out = inputs["root"] / "resume" / "r.json"
    cache = out.with_name("r.cache")
    with pytest.raises(Interrupt):
        run(inputs, CountingEncoder(encoder, fail_after=2), out)  # one call per 32-sample chunk
    done = sorted(p.name for p in cache.glob("images-*.npy"))
    assert done == ["images-000000.npy", "images-000001.npy"] and not out.exists()
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    resumed = CountingEncoder(encoder)
    run(inputs, resumed, out)
    assert resumed.images == N_SAMPLES - 64  # only chunks 2 and 3 (32 + 24 samples) were embedded
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished chunks untouched
    ref, _ = first
    assert out.with_name("r.picks.npy").read_bytes() == ref.with_name("a.picks.npy").read_bytes()


def test_cache_of_other_inputs_is_refused(inputs, encoder, first):
    out, _ = first
    with pytest.raises(embed_cache.CacheError, match="chunk_size"):
        run(inputs, encoder, inputs["root"] / "sel" / "c.json", chunk_size=16, cache_dir=str(out.with_name("a.cache")))


def test_bad_concepts_file(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("cat\n\ndog\n")
    with pytest.raises(balance.BalanceInputError, match="line 2 is blank"):
        balance.read_concepts(str(p))
    p.write_text("cat\ndog\ncat\n")
    with pytest.raises(balance.BalanceInputError, match="line 3 repeats line 1"):
        balance.read_concepts(str(p))


def test_pack_consumes_the_selection(inputs, encoder, first, tmp_path):
    from array_record.python.array_record_module import ArrayRecordReader

    from ovjax.data import pack, schema

    out, _ = first
    sel_path = inputs["root"] / "sel" / "forpack.json"
    run(inputs, encoder, sel_path, target=40, replace=False, cache_dir=str(out.with_name("a.cache")))
    picks = selection.read_selection(sel_path).picks
    manifest = pack.pack(str(sel_path), str(tmp_path / "packed"), pack.Budgets(seq_len=1024))
    assert manifest["counts"]["samples_packed"] == 40
    want = set()
    raw = selection.read_selection(sel_path)
    for s, k, r in picks.tolist():
        reader = ArrayRecordReader(raw.shard_paths[s][k])
        want.add(schema.loads(reader.read([r])[0])["id"])
        reader.close()
    got = set()
    for shard in manifest["shards"]:
        reader = ArrayRecordReader(str(tmp_path / "packed" / shard["file"]))
        for data in reader.read_all():
            got.update(s["id"] for s in schema.loads(data)["samples"])
        reader.close()
    assert got == want


def test_cli_verb(inputs, first, capsys):
    from ovjax import cli

    out, _ = first
    cli_out = inputs["root"] / "cli" / "b.json"
    args = ["balance", "--raw", str(inputs["raw"]), "--concepts", str(inputs["concepts"]), "--encoder",
            str(inputs["clip"]), "--top-k", str(TOP_K), "--target", "200", "--seed", "3", "--out", str(cli_out),
            "--chunk-size", "32", "--no-progress"]
    assert cli.main(args) == 0  # fresh cache, its own encoder (batch 64), default retrieval chunks
    assert "top-1% share" in capsys.readouterr().err
    assert cli_out.with_name("b.picks.npy").read_bytes() == out.with_name("a.picks.npy").read_bytes()
    bad = inputs["root"] / "cli" / "bad.txt"
    bad.write_text("cat\ncat\n")
    assert cli.main(args[:4] + [str(bad)] + args[5:]) == 1
    err = capsys.readouterr().err
    assert "balance: error:" in err and "line 2 repeats line 1" in err
