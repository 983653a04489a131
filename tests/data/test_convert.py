"""convert: the three input formats, every reject reason counted, manifest checks, abort threshold."""

import hashlib
import json
import os

import numpy as np
import pytest

from ovjax.data import convert, schema
from tests.data._make_inputs import conv, jpeg_bytes, make_tokenizer, png_bytes, write_json, write_parquet, write_tar

SEQ_LEN = 200


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def read_records(out_dir, manifest):
    from array_record.python.array_record_module import ArrayRecordReader

    recs = []
    for shard in manifest["shards"]:
        r = ArrayRecordReader(str(out_dir / shard["file"]))
        data = r.read_all()
        r.close()
        assert len(data) == shard["records"]
        recs.extend(schema.validate_raw(schema.loads(d)) for d in data)
    return recs


def check_manifest(out_dir, manifest):
    on_disk = json.loads((out_dir / "manifest.json").read_text())
    assert on_disk == manifest
    c = manifest["counts"]
    assert c["seen"] == c["written"] + c["rejected"]
    assert sum(manifest["rejected_by_reason"].values()) == c["rejected"]
    assert sum(s["records"] for s in manifest["shards"]) == c["written"]
    for s in manifest["shards"]:
        assert hashlib.sha256((out_dir / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    rejects = [json.loads(line) for line in (out_dir / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == c["rejected"]
    return rejects


# ------------------------------------------------------------------------------------------- LLaVA JSON

@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    imgs = root / "images" / "imgs"
    imgs.mkdir(parents=True)
    good1, good2 = png_bytes(56, 56, seed=1), jpeg_bytes(60, 90, seed=2)
    (imgs / "good1.png").write_bytes(good1)
    (imgs / "good2.jpg").write_bytes(good2)
    (imgs / "garbage.png").write_bytes(b"this is not an image")
    (imgs / "wide.png").write_bytes(png_bytes(2, 500))
    (root / "outside.png").write_bytes(good1)
    os.symlink(root / "outside.png", imgs / "link.png")
    q = "<image>\nWhat is in the image?"
    entries = [
        {"id": "ok1", "image": "imgs/good1.png", "conversations": conv(q, "A1")},
        {"id": "ok2", "image": ["imgs/good1.png", "imgs/good2.jpg"],
         "conversations": conv("<image> and <image>: same?", "No.")},
        {"id": "ok3", "conversations": conv("Say hi.", "Hi.")},
        {"id": "ok4", "image": "imgs/good2.jpg", "conversations": conv("Describe.", "A photo.")},
        {"id": "missing", "image": "imgs/nope.png", "conversations": conv(q, "x")},
        {"id": "garbage", "image": "imgs/garbage.png", "conversations": conv(q, "x")},
        {"id": "dotdot", "image": "../outside.png", "conversations": conv(q, "x")},
        {"id": "abs", "image": str(imgs / "good1.png"), "conversations": conv(q, "x")},
        {"id": "link", "image": "imgs/link.png", "conversations": conv(q, "x")},
        {"id": "mismatch", "image": "imgs/good1.png", "conversations": conv("<image><image>", "x")},
        {"id": "empty", "image": "imgs/good1.png", "conversations": conv(q, "")},
        {"id": "wide", "image": "imgs/wide.png", "conversations": conv(q, "x")},
        {"id": "long", "conversations": conv("cat dog sea sun " * 150, "x")},
        {"id": "ok1", "image": "imgs/good1.png", "conversations": conv(q, "again")},
        "junk",
    ]
    return {"json": write_json(root / "data.json", entries), "root": root / "images", "good1": good1,
            "good2": good2}


LLAVA_REJECTS = {"bad_aspect_ratio": 1, "bad_image_path": 3, "duplicate_id": 1, "empty_assistant": 1,
                 "malformed_record": 1, "missing_image": 1, "placeholder_mismatch": 1, "too_long": 1,
                 "undecodable": 1}


def run_llava(llava, tok_dir, out, **kw):
    params = convert.Params(tokenizer=str(tok_dir), seq_len=SEQ_LEN)
    kw.setdefault("max_reject_fraction", 1.0)
    return convert.convert(out_dir=out, params=params, json_files=[llava["json"]], image_root=llava["root"],
                           records_per_shard=3, **kw)


def test_llava_json(llava, tok_dir, tok, tmp_path):
    out = tmp_path / "out"
    m = run_llava(llava, tok_dir, out)
    assert m["status"] == "complete"
    assert m["counts"]["seen"] == 15 and m["counts"]["written"] == 4 and m["counts"]["rejected"] == 11
    assert m["rejected_by_reason"] == LLAVA_REJECTS
    rejects = check_manifest(out, m)
    assert {r["id"]: r["reason"] for r in rejects}["data.json:dotdot"] == "bad_image_path"
    assert {r["id"]: r["reason"] for r in rejects}["data.json:link"] == "bad_image_path"
    assert [s["file"] for s in m["shards"]] == ["raw-00000-of-00002.array_record", "raw-00001-of-00002.array_record"]
    assert [s["records"] for s in m["shards"]] == [3, 1]
    assert m["parameters"]["seq_len"] == SEQ_LEN and m["parameters"]["min_pixels"] == 3136

    recs = read_records(out, m)
    assert [r["id"] for r in recs] == ["data.json:ok1", "data.json:ok2", "data.json:ok3", "data.json:ok4"]
    # grids by hand: 56x56 -> 56x56 (1,4,4); 60x90 -> 56x84 (1,4,6)
    assert [r["grids"].tolist() for r in recs] == [[[1, 4, 4]], [[1, 4, 4], [1, 4, 6]], [], [[1, 4, 6]]]
    assert recs[1]["images"] == [llava["good1"], llava["good2"]]
    assert recs[3]["images"] == [llava["good2"]]
    assert recs[0]["meta"] == {"source": "data.json", "index": "0"}
    expected0 = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                 + "<|image_pad|>" * 4 + "<|vision_end|>\nWhat is in the image?<|im_end|>\n"
                 "<|im_start|>assistant\nA1<|im_end|>\n")
    assert recs[0]["tokens"].tolist() == tok.encode(expected0, add_special_tokens=False)
    assert tok.decode(recs[0]["tokens"][recs[0]["loss_mask"]]) == "A1<|im_end|>"
    # LLaVA convention: no placeholder -> image first in the first user turn
    assert tok.decode(recs[3]["tokens"]).count("<|vision_end|>\nDescribe.") == 1
    assert m["counts"]["tokens"] == sum(len(r["tokens"]) for r in recs)
    assert m["counts"]["supervised_tokens"] == sum(int(r["loss_mask"].sum()) for r in recs)
    assert m["counts"]["patches"] == 16 + 16 + 24 + 24


def test_workers_do_not_change_output(llava, tok_dir, tmp_path):
    m1 = run_llava(llava, tok_dir, tmp_path / "w1", workers=1)
    m2 = run_llava(llava, tok_dir, tmp_path / "w2", workers=2)
    assert m1 == m2
    assert (tmp_path / "w1" / "rejects.jsonl").read_bytes() == (tmp_path / "w2" / "rejects.jsonl").read_bytes()


def test_abort_at_end(llava, tok_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--json", str(llava["json"]), "--image-root", str(llava["root"]), "--tokenizer", str(tok_dir),
            "--out", str(out), "--seq-len", str(SEQ_LEN), "--workers", "1", "--max-reject-fraction", "0.5"]
    assert convert.main(args) == 1  # 11/15 rejected > 50%, found at the end (default minimum is 1000 samples)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "aborted" and "11 of 15" in m["abort_reason"]
    assert m["rejected_by_reason"] == LLAVA_REJECTS
    check_manifest(out, m)


def test_abort_early(llava, tok_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(convert.ConvertError, match="2 of 6"):
        # 4 good samples then rejects: at 6 seen, 2/6 > 0.3 (5 seen: 1/5 is not)
        run_llava(llava, tok_dir, out, max_reject_fraction=0.3, abort_min_samples=5)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "aborted"
    assert m["counts"]["seen"] == 6 and m["counts"]["written"] == 4
    assert m["rejected_by_reason"] == {"missing_image": 1, "undecodable": 1}
    check_manifest(out, m)


def test_refuses_existing_output(llava, tok_dir, tmp_path):
    run_llava(llava, tok_dir, tmp_path / "out")
    with pytest.raises(convert.ConvertError, match="already holds"):
        run_llava(llava, tok_dir, tmp_path / "out")


def test_help_and_bad_args(tok_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert.main(["--help"])
    assert e.value.code == 0 and "--parquet" in capsys.readouterr().out
    assert convert.main(["--tokenizer", str(tok_dir), "--out", str(tmp_path / "o")]) == 1  # no input
    assert convert.main(["--parquet", str(tmp_path / "none/**/*.parquet"), "--tokenizer", str(tok_dir),
                         "--out", str(tmp_path / "o2")]) == 1  # glob matches nothing


# ---------------------------------------------------------------------------------------------- parquet

def test_parquet_nested(tok_dir, tok, tmp_path):
    root = tmp_path / "pq"
    img0, img3 = png_bytes(56, 56, seed=7), jpeg_bytes(100, 300, seed=8)
    write_parquet(root / "a" / "b" / "part-0.parquet", [
        {"id": "p0", "image": img0, "caption": "A red cat."},
        {"id": "p1", "image": b"\x89PNG broken", "caption": "x"},
        {"id": "p2", "image": img0, "caption": ""},
    ], image_as_struct=False)
    write_parquet(root / "c" / "part-1.parquet", [
        {"id": "p3", "image": img3, "caption": "A wide street."},
        {"id": "p4", "image": None, "path": "x.jpg", "caption": "x"},
    ], image_as_struct=True)
    (root / "notes.txt").write_text("not parquet")
    out = tmp_path / "out"
    rc = convert.main(["--parquet", str(root / "**" / "*.parquet"), "--tokenizer", str(tok_dir), "--out", str(out),
                       "--caption-prompt", "Describe the image.", "--max-reject-fraction", "1", "--workers", "1"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert [f["path"] for f in m["inputs"][0]["files"]] == ["a/b/part-0.parquet", "c/part-1.parquet"]
    assert m["counts"]["seen"] == 5 and m["counts"]["written"] == 2
    assert m["rejected_by_reason"] == {"empty_assistant": 1, "missing_image": 1, "undecodable": 1}
    check_manifest(out, m)
    recs = read_records(out, m)
    assert [r["id"] for r in recs] == ["a/b/part-0.parquet:p0", "c/part-1.parquet:p3"]
    assert recs[0]["images"] == [img0] and recs[1]["images"] == [img3]
    assert [r["grids"].tolist() for r in recs] == [[[1, 4, 4]], [[1, 8, 22]]]
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                + "<|image_pad|>" * 4 + "<|vision_end|>\nDescribe the image.<|im_end|>\n"
                "<|im_start|>assistant\nA red cat.<|im_end|>\n")
    assert recs[0]["tokens"].tolist() == tok.encode(expected, add_special_tokens=False)
    assert tok.decode(recs[1]["tokens"][recs[1]["loss_mask"]]) == "A wide street.<|im_end|>"


# ------------------------------------------------------------------------------------------- webdataset

def test_webdataset(tok_dir, tok, tmp_path):
    root = tmp_path / "wds"
    j = lambda obj: json.dumps(obj).encode()  # noqa: E731
    a, b, c0, c2, c10 = (png_bytes(56, 56, seed=i) for i in range(5))
    write_tar(root / "shard-0.tar", [
        ("s0.jpg", jpeg_bytes(56, 56)), ("s0.json", j({"conversations": conv("<image>\nWhat?", "A dog.")})),
        ("s1.png", a), ("s1.json", j({"caption": "Sunset."})),
        ("s2.img10.png", c10), ("s2.img0.png", c0), ("s2.img2.png", c2),
        ("s2.json", j({"messages": [{"role": "user", "content": "<image><image><image>Differences?"},
                                    {"role": "assistant", "content": "None."}]})),
        ("s3.txt", b"ignored"), ("s3.json", j({"caption": "A tree."})), ("s3.png", b),
        ("../evil.jpg", b), ("../evil.json", j({"caption": "x"})),
        ("/abs.json", j({"caption": "x"})),
        ("lnk.jpg", None, "/etc/passwd"), ("lnk.json", j({"caption": "x"})),
        ("s4.jpg", b),
        ("s5.json", b"{not json"), ("s5.png", b),
    ])
    write_tar(root / "sub" / "shard-1.tar", [("t0.json", j({"caption": "Nested."})), ("t0.jpeg", a)])
    out = tmp_path / "out"
    params = convert.Params(tokenizer=str(tok_dir), seq_len=SEQ_LEN)
    m = convert.convert(out_dir=out, params=params, wds_globs=[str(root / "**" / "*.tar")], max_reject_fraction=1)
    assert m["counts"]["seen"] == 10 and m["counts"]["written"] == 5
    assert m["rejected_by_reason"] == {"malformed_record": 1, "missing_json": 1, "unsafe_tar_member": 3}
    assert m["ignored_tar_members"] == {"txt": 1}
    rejects = check_manifest(out, m)
    assert {r["id"]: r["reason"] for r in rejects}["shard-0.tar:../evil"] == "unsafe_tar_member"
    assert not (tmp_path / "evil.jpg").exists() and not (root / "evil.jpg").exists()
    recs = read_records(out, m)
    assert [r["id"] for r in recs] == ["shard-0.tar:s0", "shard-0.tar:s1", "shard-0.tar:s2", "shard-0.tar:s3",
                                       "sub/shard-1.tar:t0"]
    assert recs[2]["images"] == [c0, c2, c10]  # img0, img2, img10: numeric order
    assert recs[3]["images"] == [b]
    assert tok.decode(recs[1]["tokens"][recs[1]["loss_mask"]]) == "Sunset.<|im_end|>"
    assert tok.decode(recs[2]["tokens"][recs[2]["loss_mask"]]) == "None.<|im_end|>"
    assert int((recs[2]["tokens"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum()) == 12
    assert all(np.array_equal(r["grids"], [[1, 4, 4]] * len(r["images"])) for r in recs)


def test_reject_reasons_list():
    for reason in ("missing_image", "undecodable", "placeholder_mismatch", "empty_assistant", "bad_aspect_ratio",
                   "too_long", "bad_image_path", "unsafe_tar_member"):
        assert reason in convert.REJECT_REASONS
    assert len(set(convert.REJECT_REASONS)) == len(convert.REJECT_REASONS)


def test_webdataset_upstream_layouts(tok_dir, tok, tmp_path):
    """Chat lists, mixed media and caption packs: every good sample kept, each bad one rejected with a reason,
    caption packs split into one sample per image."""
    root = tmp_path / "wds"
    j = lambda obj: json.dumps(obj).encode()  # noqa: E731
    a, b, c, d = (png_bytes(56, 56, seed=i) for i in range(4))
    chat_rc = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A dog."}]
    chat_fv = [{"from": "human", "value": "<image>\nAnd?"}, {"from": "gpt", "value": "A cat."}]
    two = [{"role": "user", "content": "<image><image>Same?"}, {"role": "assistant", "content": "No."}]
    write_tar(root / "chat.tar", [
        ("c0.jpg", jpeg_bytes(56, 56)), ("c0.json", j(chat_rc)),
        ("c1.png", a), ("c1.json", j(chat_fv)),
        ("c2.png", a), ("c2.json", j([])),                                        # empty list: bad
        ("c3.png", a), ("c3.json", j(["not a message"])),                         # bad
        ("c4.json", j(chat_rc)),                                                  # no image for <image>: bad
    ])
    write_tar(root / "mixed.tar", [
        ("m0.json", j({"texts": two, "media": "image", "name": ["0_b.png", "1_a.png"]})),
        ("m0.0_b.png", b), ("m0.1_a.png", a),
        ("m1.json", j({"texts": chat_rc, "media": "video", "name": ["0_v.mp4"]})), ("m1.0_v.mp4", b"video"),
        ("m2.json", j({"texts": chat_rc, "media": "image", "name": ["0_gone.png"]})),  # member missing
        ("m3.json", j({"texts": "hello", "media": "image", "name": ["0_x.png"]})), ("m3.0_x.png", a),
        ("m4.json", j({"texts": chat_rc, "media": "audio", "name": ["0_x.png"]})), ("m4.0_x.png", a),
    ])
    write_tar(root / "pack.tar", [
        ("p0.json", j({"images": ["img0.png", "img1.png", "img2.png"], "captions": ["Red.", "Green.", "Blue."],
                       "prompts": ["Describe.", "", "<image>\nWhat colour?"]})),
        ("p0.img0.png", b), ("p0.img1.png", c), ("p0.img2.png", d),
        ("p1.json", j({"images": ["img0.png", "img1.png"], "captions": ["One.", 7]})),      # caption 1 bad
        ("p1.img0.png", a), ("p1.img1.png", b),
        ("p2.json", j({"images": ["img0.png", "img9.png"], "captions": ["Here.", "Gone."]})),  # img9 missing
        ("p2.img0.png", c),
        ("p3.json", j({"images": ["img0.png"], "captions": ["A.", "B."]})), ("p3.img0.png", a),  # lengths differ
        ("p4.json", j({"images": ["img0.png"], "captions": ["A."], "prompts": []})), ("p4.img0.png", a),
    ])
    out = tmp_path / "out"
    params = convert.Params(tokenizer=str(tok_dir), seq_len=SEQ_LEN)
    m = convert.convert(out_dir=out, params=params, wds_globs=[str(root / "*.tar")], max_reject_fraction=1)
    rejects = check_manifest(out, m)
    by_id = {r["id"]: r["reason"] for r in rejects}
    assert by_id == {
        "chat.tar:c2": "malformed_record", "chat.tar:c3": "malformed_record", "chat.tar:c4": "placeholder_mismatch",
        "mixed.tar:m1": "video_unsupported", "mixed.tar:m2": "missing_image", "mixed.tar:m3": "malformed_record",
        "mixed.tar:m4": "malformed_record",
        "pack.tar:p1:1": "malformed_record", "pack.tar:p2:1": "missing_image", "pack.tar:p3": "malformed_record",
        "pack.tar:p4": "malformed_record",
    }
    assert m["ignored_tar_members"] == {"0_v.mp4": 1}
    recs = read_records(out, m)
    assert [r["id"] for r in recs] == ["chat.tar:c0", "chat.tar:c1", "mixed.tar:m0", "pack.tar:p0:0",
                                       "pack.tar:p0:1", "pack.tar:p0:2", "pack.tar:p1:0", "pack.tar:p2:0"]
    assert m["counts"] == {**m["counts"], "seen": 19, "written": 8, "rejected": 11}
    answers = [tok.decode(r["tokens"][r["loss_mask"]]) for r in recs]
    assert answers == [s + "<|im_end|>" for s in ("A dog.", "A cat.", "No.", "Red.", "Green.", "Blue.", "One.",
                                                 "Here.")]
    assert recs[2]["images"] == [b, a]  # the order `name` gives, not the member order
    assert [r["images"] for r in recs[3:]] == [[b], [c], [d], [a], [c]]
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert [int((r["tokens"] == pad).sum()) for r in recs] == [4, 4, 8, 4, 4, 4, 4, 4]
    user = lambda r: tok.decode(r["tokens"]).split("<|im_start|>user\n")[1].split("<|im_end|>")[0]  # noqa: E731
    vision = "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
    assert [user(r) for r in recs[3:6]] == [vision + "\nDescribe.", vision, vision + "\nWhat colour?"]


def test_max_side_caps_the_longest_side(tok_dir, tmp_path):
    from PIL import Image
    import io as stdio

    root = tmp_path / "wds"
    j = lambda obj: json.dumps(obj).encode()  # noqa: E731
    wide, small = png_bytes(100, 200, seed=1), png_bytes(40, 60, seed=2)
    write_tar(root / "s.tar", [("w.png", wide), ("w.json", j({"caption": "Wide."})),
                               ("s.png", small), ("s.json", j({"caption": "Small."}))])
    out = tmp_path / "out"
    m = convert.convert(out_dir=out, params=convert.Params(tokenizer=str(tok_dir), seq_len=SEQ_LEN, max_side=100),
                        wds_globs=[str(root / "*.tar")], max_reject_fraction=0)
    assert m["parameters"]["max_side"] == 100
    recs = read_records(out, m)
    capped = Image.open(stdio.BytesIO(recs[0]["images"][0]))
    assert capped.format == "PNG" and capped.size == (100, 50)  # (w, h): the 200 px side scaled to 100
    assert recs[0]["grids"].tolist() == [[1, 4, 8]]  # smart_resize of 50 x 100 (uncapped 100 x 200: 8 x 14)
    assert recs[1]["images"] == [small]  # under the cap: the original bytes
    assert convert.main(["--tokenizer", str(tok_dir), "--out", str(tmp_path / "x"), "--wds", "a", "--max-side",
                         "-1"]) == 2
