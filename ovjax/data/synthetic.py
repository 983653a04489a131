"""A synthetic visual-question dataset made on the fly: images of coloured shapes, captions, questions.

Scene: an image of `width x height` pixels (native sizes and aspect ratios, 80..120 px a side; smart_resize
makes them 84 or 112 px, grids 6x6 to 8x8 patches) on a light background, cut into 2x2 quadrants; `count`
(1..4) objects of ONE colour and ONE shape, each large (34..38 px, whatever the image size) inside its own
quadrant. Every attribute asked about is a property of the
whole image, never of one object among several: a small model binds an attribute to a named object among
several only at chance (measured while designing the demo), so the task avoids that.

Texts (all lower case):
  caption (stages 1, 1.5)  "three red circles."  /  "one blue square at the top left."
  question types (stage 2) and their answers:
    colour    "what colour are the shapes?"  -> red | green | blue | yellow | purple | orange
    count     "how many shapes are there?"   -> one | two | three | four
    shape     "what shape are they?"         -> circle | square | triangle
    position  "where is the shape?"          -> top left | top right | bottom left | bottom right
              (asked only of one-object scenes: the quadrant of that object)

A training sample of stage 2 is one conversation over one image asking every question type the image allows
(up to `max_turns`), in random order;
an evaluation item is one question. `write_split` writes LLaVA JSON + PNG files that `ovjax.data.convert`
reads. Everything is a pure function of the seed.

The verb makes the packed set (tokenizer -> LLaVA JSON + PNGs -> convert -> pack), reusing what exists:

    python -m ovjax synth --out DIR --config configs/stage2.py:tiny      # shapes and kind from a run config
    python -m ovjax synth --out DIR --kind qa --samples 2000 --seq-len 256 --max-patches 256 --max-images 8

It prints the packed directory and the tokenizer directory; train with `--config.data.train=PACKED`.
`python -m ovjax train` with an empty `data.train` (tiny/demo models) runs this same function up front.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (230, 200, 30),
           "purple": (140, 50, 170), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three", "four")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # quadrant index 0..3
QUESTIONS = {
    "colour": "what colour are the shapes?",
    "count": "how many shapes are there?",
    "shape": "what shape are they?",
    "position": "where is the shape?",
}
QUESTION_TYPES = tuple(QUESTIONS)
MIN_SIDE, MAX_SIDE = 80, 120
MAX_PIXELS = 112 * 112  # the largest smart_resize output of MAX_SIDE x MAX_SIDE
OBJECT_SIZE = (34, 38)  # px, inclusive: about the same for every image, so the area of colour counts objects


def answers(qtype: str) -> tuple[str, ...]:
    """The candidate answers of a question type (the label set the evaluation scores over)."""
    return {"colour": tuple(COLOURS), "count": COUNT_WORDS, "shape": SHAPES, "position": POSITIONS}[qtype]


@dataclasses.dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    colour: str
    shape: str
    count: int
    boxes: tuple[tuple[int, int, int, int], ...]  # (quadrant, x0, y0, size) per object

    @property
    def quadrants(self) -> tuple[int, ...]:
        return tuple(b[0] for b in self.boxes)


def random_scene(rng: np.random.Generator, *, colour: str | None = None, shape: str | None = None,
                 count: int | None = None, quadrant: int | None = None) -> Scene:
    """A random scene; any attribute may be fixed (quadrant only with count 1)."""
    w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    count = count or int(rng.integers(1, 5))
    if quadrant is not None and count != 1:
        raise ValueError("a quadrant can be fixed only for a one-object scene")
    quads = [quadrant] if quadrant is not None else sorted(rng.choice(4, size=count, replace=False).tolist())
    cw, ch = w // 2, h // 2
    boxes = []
    for q in quads:
        size = int(rng.integers(OBJECT_SIZE[0], OBJECT_SIZE[1] + 1))
        x0 = (q % 2) * cw + int(rng.integers(0, cw - size + 1))
        y0 = (q // 2) * ch + int(rng.integers(0, ch - size + 1))
        boxes.append((int(q), x0, y0, size))
    bg = tuple(int(v) for v in rng.integers(225, 256, size=3))
    return Scene(w, h, bg, colour, shape, count, tuple(boxes))


def render(scene: Scene) -> Image.Image:
    """The RGB image of a scene (deterministic)."""
    im = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(im)
    fill = COLOURS[scene.colour]
    for _, x0, y0, s in scene.boxes:
        if scene.shape == "circle":
            draw.ellipse((x0, y0, x0 + s - 1, y0 + s - 1), fill=fill)
        elif scene.shape == "square":
            draw.rectangle((x0, y0, x0 + s - 1, y0 + s - 1), fill=fill)
        else:
            draw.polygon([(x0 + s / 2, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=fill)
    return im


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def answer(scene: Scene, qtype: str) -> str:
    if qtype == "colour":
        return scene.colour
    if qtype == "count":
        return COUNT_WORDS[scene.count - 1]
    if qtype == "shape":
        return scene.shape
    if qtype == "position":
        if scene.count != 1:
            raise ValueError("position is asked only of one-object scenes")
        return POSITIONS[scene.quadrants[0]]
    raise ValueError(f"unknown question type {qtype!r}; known {QUESTION_TYPES}")


def caption(scene: Scene) -> str:
    noun = scene.shape + ("s" if scene.count > 1 else "")
    where = f" at the {POSITIONS[scene.quadrants[0]]}" if scene.count == 1 else ""
    return f"{COUNT_WORDS[scene.count - 1]} {scene.colour} {noun}{where}."


def question_types(scene: Scene) -> tuple[str, ...]:
    return QUESTION_TYPES if scene.count == 1 else tuple(t for t in QUESTION_TYPES if t != "position")


def caption_conversation(scene: Scene) -> list[dict]:
    return [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(scene)}]


def qa_conversation(scene: Scene, rng: np.random.Generator, max_turns: int = 4) -> list[dict]:
    """min(max_turns, applicable types) question turns of distinct types in random order; the image sits in
    the first user turn. Every turn's answer is supervised, so one image teaches every question type it
    allows (its first turn is exactly the single-question prompt of the evaluation)."""
    types = list(question_types(scene))
    rng.shuffle(types)
    types = types[:min(max_turns, len(types))]
    conv = []
    for i, t in enumerate(types):
        conv.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + QUESTIONS[t]})
        conv.append({"from": "gpt", "value": answer(scene, t)})
    return conv


def _fixed(qtype: str, ans: str) -> dict:
    """random_scene arguments that make `ans` the answer of `qtype`."""
    if qtype == "colour":
        return {"colour": ans}
    if qtype == "count":
        return {"count": COUNT_WORDS.index(ans) + 1}
    if qtype == "shape":
        return {"shape": ans}
    return {"count": 1, "quadrant": POSITIONS.index(ans)}


def eval_items(n_per_answer: int, seed: int, types=QUESTION_TYPES) -> list[dict]:
    """Held-out single questions, balanced: `n_per_answer` fresh scenes for every answer of every type.

    -> [{"type", "question", "answer", "scene"}]; chance accuracy of a type is 1 / len(answers(type))."""
    rng = np.random.default_rng([seed, 7])
    items = []
    for t in types:
        for a in answers(t):
            for _ in range(n_per_answer):
                kw = _fixed(t, a)
                scene = random_scene(rng, **kw)
                items.append({"type": t, "question": QUESTIONS[t], "answer": answer(scene, t), "scene": scene})
    return items


def corpus() -> list[str]:
    """Every text the dataset can produce (plus chat-template words), for training the tokenizer."""
    texts = ["system\n", "user\n", "assistant\n", "\n"]
    texts += list(QUESTIONS.values())
    for c in COLOURS:
        for s in SHAPES:
            for n in range(1, 5):
                for q in (range(4) if n == 1 else [0]):
                    boxes = ((q, 0, 0, 1),) if n == 1 else tuple((i, 0, 0, 1) for i in range(n))
                    texts.append(caption(Scene(1, 1, (0, 0, 0), c, s, n, boxes)))
    texts += [a for t in QUESTION_TYPES for a in answers(t)]
    return texts * 4  # frequency >= min_frequency for every merge of these strings


def write_split(out_dir: str | os.PathLike, n: int, seed: int, kind: str, *, max_turns: int = 4) -> Path:
    """Write `n` samples of `kind` ("caption" | "qa") as LLaVA JSON (`data.json`) + PNGs under `images/`.

    Returns the JSON path. Deterministic in (n, seed, kind)."""
    if kind not in ("caption", "qa"):
        raise ValueError(f"kind must be 'caption' or 'qa', got {kind!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0 if kind == "caption" else 1])
    entries = []
    for i in range(n):
        scene = random_scene(rng)
        name = f"images/{kind}-{i:06d}.png"
        (out / name).write_bytes(png_bytes(render(scene)))
        conv = caption_conversation(scene) if kind == "caption" else qa_conversation(scene, rng, max_turns)
        entries.append({"id": f"{kind}-{i:06d}", "image": name, "conversations": conv})
    path = out / "data.json"
    path.write_text(json.dumps(entries, indent=0) + "\n")
    return path


# ----------------------------------------------------------------------------- made on first use

TOKENIZER_VOCAB = 512  # an upper bound: the corpus runs out of merges near 380 tokens


def ensure_tokenizer(root: str | os.PathLike) -> Path:
    """`root/tokenizer` (an HF tokenizer directory with the Qwen special tokens), built if missing."""
    from ovjax.data.tokenizer import build_tokenizer

    out = Path(root) / "tokenizer"
    if not (out / "tokenizer.json").exists():
        tmp = Path(str(out) + ".partial")
        build_tokenizer(tmp, corpus(), vocab_size=TOKENIZER_VOCAB)
        os.replace(tmp, out)
    return out


def ensure_packed(root: str | os.PathLike, kind: str, *, n: int, seed: int, seq_len: int, max_patches: int,
                  max_images: int, max_segments: int | None = None, max_turns: int = 4,
                  max_pixels: int = MAX_PIXELS, log=print) -> Path:
    """Make (once) the packed set of `n` synthetic samples of `kind` under `root`:
    tokenizer -> LLaVA JSON + PNGs -> `ovjax.data.convert` -> `ovjax.data.pack`. Each step is skipped when
    its output is complete, so a rerun (or a resumed run) reuses the data. Returns the packed directory."""
    from ovjax.data import convert, pack

    root = Path(root).absolute()
    tok = ensure_tokenizer(root)
    name = f"{kind}-n{n}-s{seed}-t{max_turns}-px{max_pixels}"
    packed = root / f"{name}-packed-L{seq_len}-P{max_patches}-I{max_images}-S{max_segments or 0}"
    if (packed / "manifest.json").exists():
        return packed
    src, raw = root / f"{name}-src", root / f"{name}-raw"
    if not (src / "data.json").exists():
        log(f"synthetic: writing {n} {kind} samples to {src}")
        tmp = Path(str(src) + ".partial")
        write_split(tmp, n, seed, kind, max_turns=max_turns)
        os.replace(tmp, src)
    if not (raw / "manifest.json").exists():
        log(f"synthetic: converting -> {raw}")
        tmp = Path(str(raw) + ".partial")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        params = convert.Params(tokenizer=str(tok), seq_len=seq_len, max_pixels=max_pixels, default_system="")
        convert.convert(out_dir=tmp, params=params, json_files=[str(src / "data.json")], image_root=str(src),
                        workers=1, log_every=0)
        os.replace(tmp, raw)
    log(f"synthetic: packing -> {packed}")
    tmp = Path(str(packed) + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    pack.pack(str(raw), str(tmp), pack.Budgets(seq_len, max_patches=max_patches, max_segments=max_segments,
                                               max_images=max_images), seed=seed, workers=1)
    os.replace(tmp, packed)
    return packed


# ----------------------------------------------------------------------------- the verb

@dataclasses.dataclass(frozen=True)
class SynthSpec:
    """Everything that determines one packed synthetic set (`make` reuses a set made with the same spec)."""
    out: str
    kind: str = "caption"
    samples: int = 2000
    seed: int = 0
    seq_len: int = 64
    max_patches: int = 64
    max_images: int = 4
    max_segments: int = 0  # 0 = no limit
    max_turns: int = 4
    max_pixels: int = MAX_PIXELS

    def command(self) -> str:
        """The `python -m ovjax synth` command line that makes this set."""
        flags = " ".join(f"--{f.name.replace('_', '-')} {getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"python -m ovjax synth {flags}"


def spec_for_run(cfg, out: str | os.PathLike) -> SynthSpec:
    """The set a run config asks for (sections train and data; `data.synthetic*`, `data.max_pixels`)."""
    t, d = cfg.train, cfg.data
    max_pixels = d.max_pixels or min(MAX_PIXELS, (t.max_patches // 2) * 196)  # ~2 images a row
    # one merged token is 28x28 px; keep whole merge cells and stay within the row's patch budget
    max_pixels = max(3136, (max_pixels // 784) * 784)
    turns = d.synthetic_max_turns or (1 if t.seq_len < 128 else 4)
    return SynthSpec(out=str(Path(out).absolute()), kind=d.synthetic, samples=int(d.synthetic_samples),
                     seed=int(d.seed), seq_len=int(t.seq_len), max_patches=int(t.max_patches),
                     max_images=int(t.max_images), max_segments=int(t.max_segments or 0), max_turns=int(turns),
                     max_pixels=int(max_pixels))


def make(spec: SynthSpec, log=print) -> tuple[Path, Path]:
    """-> (packed dir, tokenizer dir) of `spec`, made under `spec.out` unless there already."""
    packed = ensure_packed(spec.out, spec.kind, n=spec.samples, seed=spec.seed, seq_len=spec.seq_len,
                           max_patches=spec.max_patches, max_images=spec.max_images,
                           max_segments=spec.max_segments or None, max_turns=spec.max_turns,
                           max_pixels=spec.max_pixels, log=log)
    return packed, Path(spec.out).absolute() / "tokenizer"


def main(argv: list[str] | None = None) -> int:
    from ovjax import config

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m ovjax synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory of the set (reused when already made)")
    parser.add_argument("--config", help="a run config FILE.py:ARG to take the kind and shapes from")
    for f in dataclasses.fields(SynthSpec):
        if f.name != "out":
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                                help=f"default: the config's, else {f.default}")
    try:
        rest, overrides = config.split_overrides(argv)
        args = parser.parse_args(rest)
        if args.config:
            spec = spec_for_run(config.load(args.config, overrides), args.out)
        elif overrides:
            raise config.ConfigError("--config.* overrides need --config FILE.py:ARG")
        else:
            spec = SynthSpec(out=str(Path(args.out).absolute()))
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SynthSpec)
                 if f.name != "out" and getattr(args, f.name) is not None}
        spec = dataclasses.replace(spec, **given)
        if spec.kind not in ("caption", "qa"):
            raise config.ConfigError(f"--kind must be caption or qa, got {spec.kind!r}")
        for name in ("samples", "seq_len", "max_patches", "max_images", "max_turns", "max_pixels"):
            if getattr(spec, name) < 1:
                raise config.ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(spec, name)}")
    except config.ConfigError as e:
        print(f"synth: error: {e}", file=sys.stderr)
        return 2
    packed, tok = make(spec)
    print(f"packed {packed}\ntokenizer {tok}")
    return 0
