"""The synthetic shapes dataset: answers read back from the pixels, determinism, balance, and the
convert -> pack contract with the tokenizer it trains."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ovjax.data import synthetic


def _object_mask(scene):
    """bool [H, W]: pixels of the object colour (read from the rendered image, not from the scene)."""
    px = np.asarray(synthetic.render(scene)).astype(int)
    return np.abs(px - np.array(synthetic.COLOURS[scene.colour])).sum(axis=-1) < 30


def _quadrants_with_colour(scene, mask):
    cw, ch = scene.width // 2, scene.height // 2
    found = []
    for q in range(4):
        x0, y0 = (q % 2) * cw, (q // 2) * ch
        if mask[y0:y0 + ch, x0:x0 + cw].sum() > 50:
            found.append(q)
    return found


@pytest.mark.parametrize("seed", range(6))
def test_answers_match_the_pixels(seed):
    rng = np.random.default_rng(seed)
    for _ in range(10):
        scene = synthetic.random_scene(rng)
        mask = _object_mask(scene)
        quads = _quadrants_with_colour(scene, mask)
        # count: the number of quadrants holding object pixels
        assert synthetic.answer(scene, "count") == synthetic.COUNT_WORDS[len(quads) - 1]
        # colour: every non-background pixel has the answered colour (no other object colour appears)
        px = np.asarray(synthetic.render(scene)).astype(int)
        for other, rgb in synthetic.COLOURS.items():
            if other != scene.colour:
                assert (np.abs(px - np.array(rgb)).sum(axis=-1) < 30).sum() == 0
        # shape: fill fraction of the object's bounding box (square 1, circle pi/4, triangle 1/2)
        q0 = quads[0]
        sub = mask[(q0 // 2) * (scene.height // 2):(q0 // 2 + 1) * (scene.height // 2),
                   (q0 % 2) * (scene.width // 2):(q0 % 2 + 1) * (scene.width // 2)]
        ys, xs = np.nonzero(sub)
        fill = sub.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[synthetic.answer(scene, "shape")]
        assert abs(fill - expected) < 0.08, (scene, fill)
        if scene.count == 1:
            assert synthetic.answer(scene, "position") == synthetic.POSITIONS[quads[0]]
        else:
            with pytest.raises(ValueError):
                synthetic.answer(scene, "position")


def test_sizes_and_objects_fit():
    rng = np.random.default_rng(0)
    sides = set()
    for _ in range(200):
        s = synthetic.random_scene(rng)
        assert synthetic.MIN_SIDE <= s.width <= synthetic.MAX_SIDE and synthetic.MIN_SIDE <= s.height <= synthetic.MAX_SIDE
        sides.add((s.width > s.height, s.width < s.height))
        for q, x0, y0, size in s.boxes:  # each object inside its own quadrant
            assert (q % 2) * (s.width // 2) <= x0 and x0 + size <= (q % 2 + 1) * (s.width // 2)
            assert (q // 2) * (s.height // 2) <= y0 and y0 + size <= (q // 2 + 1) * (s.height // 2)
    assert len(sides) == 3  # landscape, portrait and square images all occur


def test_deterministic(tmp_path):
    a = synthetic.write_split(tmp_path / "a", 6, seed=3, kind="qa")
    b = synthetic.write_split(tmp_path / "b", 6, seed=3, kind="qa")
    assert a.read_text() == b.read_text()
    for i in range(6):
        name = f"images/qa-{i:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    c = synthetic.write_split(tmp_path / "c", 6, seed=4, kind="qa")
    assert c.read_text() != a.read_text()


def test_qa_conversation_layout():
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = synthetic.random_scene(rng)
        conv = synthetic.qa_conversation(scene, rng, max_turns=4)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in conv) == 1
        questions = {v: k for k, v in synthetic.QUESTIONS.items()}
        seen = []
        for user, gpt in zip(conv[::2], conv[1::2]):
            qtype = questions[user["value"].replace("<image>\n", "")]
            seen.append(qtype)
            assert gpt["value"] == synthetic.answer(scene, qtype)
        assert len(seen) == len(set(seen)) and set(seen) == set(synthetic.question_types(scene))
        assert len(synthetic.qa_conversation(scene, rng, max_turns=1)) == 2


def test_eval_items_balanced_and_fresh():
    items = synthetic.eval_items(3, seed=5)
    for t in synthetic.QUESTION_TYPES:
        got = sorted(it["answer"] for it in items if it["type"] == t)
        assert got == sorted(list(synthetic.answers(t)) * 3)
    for it in items:
        assert synthetic.answer(it["scene"], it["type"]) == it["answer"]
    # held-out scenes are not the training scenes of the same seed
    train_rng = np.random.default_rng([5, 1])
    train = {synthetic.random_scene(train_rng) for _ in range(200)}
    assert not train.intersection(it["scene"] for it in items)


def test_convert_and_pack_contract(tmp_path):
    """The dataset goes through the real tokenizer, convert and pack; every sample fits and is kept."""
    from transformers import AutoTokenizer

    from ovjax.data import schema, tokenizer

    packed = synthetic.ensure_packed(tmp_path, "qa", n=24, seed=0, seq_len=128, max_patches=128, max_images=4,
                                     max_turns=2, max_pixels=84 * 84, log=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    ids = tokenizer.special_token_ids(tok)
    assert ids == {"endoftext": 0, "im_start": 1, "im_end": 2, "vision_start": 3, "vision_end": 4,
                   "image_pad": 5, "video_pad": 6}
    for words in [synthetic.answers(t) for t in synthetic.QUESTION_TYPES] + [tuple(synthetic.QUESTIONS.values())]:
        for w in words:
            assert tok.decode(tok.encode(w, add_special_tokens=False)) == w
    manifest = json.loads((packed / "manifest.json").read_text())
    assert manifest["counts"]["samples_in"] == 24 and manifest["counts"]["samples_packed"] == 24
    raw = json.loads(next(tmp_path.glob("qa-*-raw/manifest.json")).read_text())
    assert raw["counts"]["written"] == 24 and raw["counts"]["rejected"] == 0
    from array_record.python.array_record_module import ArrayRecordReader

    n = 0
    for shard in manifest["shards"]:
        r = ArrayRecordReader(str(packed / shard["file"]))
        for rec in r.read_all():
            for s in schema.validate_packed(schema.loads(rec))["samples"]:
                n += 1
                assert (s["tokens"] == ids["image_pad"]).sum() == s["grids"][0].prod() // 4
                assert s["loss_mask"].any()
        r.close()
    assert n == 24
    # made once: a second call reuses the set
    again = synthetic.ensure_packed(tmp_path, "qa", n=24, seed=0, seq_len=128, max_patches=128, max_images=4,
                                    max_turns=2, max_pixels=84 * 84, log=lambda *a: pytest.fail("rebuilt"))
    assert again == packed
