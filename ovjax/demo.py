"""`python -m ovjax demo`: the embedded end-to-end demo, on CPU, in a few minutes.

1. Parity (when the ov15-tiny fixture is there): our logits against the upstream implementation's, and the
   hub-layout export round trip.
2. Data: a synthetic visual-question dataset (ovjax/data/synthetic.py: coloured shapes at native sizes and
   aspect ratios), a byte-level BPE tokenizer trained on its texts and saved as an HF tokenizer directory
   with the Qwen special tokens, then `convert` -> `pack`.
3. Training (`ovjax.train.loop.run`, configs/demo.py) on a mesh of fake CPU devices (data=2 x fsdp=2):
   stage 1 (projector only, captions) -> stage 1.5 (everything, captions) -> stage 2 (everything,
   questions), each stage starting from the previous one's checkpoint (params only).
4. Held-out evaluation (ovjax/eval.py): per question type, the answer with the highest log-likelihood
   among the type's candidates; and the same with every image feature zeroed (the control).
   The same scoring on stage 2's mid-way checkpoint tells whether the model had begun to use the image by
   then (the recipe's known failure: an image-blind state where every answer is a guess from the question).
5. Free generation (greedy, no candidate list) for a few other held-out pictures: question, answer and
   the truth in the report, and DIR/answers.png, a grid of the pictures with them.
6. DIR/loss.png (the loss of the three stages), DIR/report.json and a short printed report, which says in
   words which stage or question type did not learn to use the image.

    python -m ovjax demo [--seed N] [--workdir DIR] [--devices 4] [--smoke] [--no-parity]

--seed N sets the model init, the synthetic training set and its order (train.seed = data.seed = N); the
held-out evaluation set is the same for every seed. Exit status 0 when colour and count reach 90% and every
control type stays within chance + 10 points (--smoke: when the pipeline ran). Rerunning with the same
--workdir reuses finished stages.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

DEFAULT_FIXTURE = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "ov15-tiny"
STAGES = ("stage1", "stage1_5", "stage2")
REQUIRED = ("colour", "count")  # types that must reach the threshold
THRESHOLD = 0.9
CONTROL_MARGIN = 0.10
# A type uses the image when its accuracy beats the zero-image control by this much. An image-blind model
# scores the same with and without the image (gain ~0, within sampling noise of a few points); a model that
# has started to read colour gains 50+ points on it. 0.25 sits far from both.
IMAGE_USE_GAIN = 0.25


def parity_report(fixture: pathlib.Path) -> dict:
    import numpy as np

    import ovjax.hf

    t0 = time.perf_counter()
    model = ovjax.hf.load(fixture)
    case = np.load(fixture / "case.npz")
    image = np.asarray(model.logits(case["input_ids"], case["pixel_values"], case["image_grid_thw"]))
    text = np.asarray(model.logits(case["text_ids"]))
    with tempfile.TemporaryDirectory() as out:
        ovjax.hf.save(model, out)
        again = ovjax.hf.load(out)
        round_trip = np.asarray(again.logits(case["text_ids"]))
    return {
        "image_logits_max_abs_diff": float(np.abs(image - case["logits"]).max()),
        "text_logits_max_abs_diff": float(np.abs(text - case["text_logits"]).max()),
        "export_round_trip_max_abs_diff": float(np.abs(round_trip - text).max()),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _ensure_devices(n: int, argv: list[str]) -> None:
    """XLA_FLAGS must hold the fake device count before jax is imported: set it, or re-exec if too late."""
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = os.environ.get("XLA_FLAGS", "")
    if flag in flags.split():
        return
    import re

    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "jax" in sys.modules:  # too late for this process
        os.execv(sys.executable, [sys.executable, "-m", "ovjax", "demo", *argv])


def loss_plot(workdir: pathlib.Path, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ovjax.train.metrics import read_jsonl

    fig, ax = plt.subplots(figsize=(8, 4.5))
    offset = 0
    for name in STAGES:
        recs = [r for r in read_jsonl(workdir / name / "metrics.jsonl") if r.get("loss") is not None]
        if not recs:
            continue
        ax.plot([offset + r["step"] for r in recs], [r["loss"] for r in recs], marker=".", label=name)
        last = recs[-1]["step"]
        ax.axvline(offset + last, color="grey", lw=0.5, ls="--")
        offset += last
    ax.set_yscale("log")
    ax.set_xlabel("step (stages one after another)")
    ax.set_ylabel("loss (per supervised token)")
    ax.set_title("ovjax demo: stage 1 -> 1.5 -> 2 on synthetic shapes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def generation_items(seed: int, per_type: int = 2) -> list[dict]:
    """A few held-out questions for free generation: `per_type` of each type, with different answers."""
    from ovjax.data import synthetic

    items = synthetic.eval_items(1, seed)
    out = []
    for t in synthetic.QUESTION_TYPES:
        of_type = [it for it in items if it["type"] == t]
        step = max(1, len(of_type) // per_type)
        out += of_type[::step][:per_type]
    return out


def generate_answers(model_cfg, params, tokenizer_dir, items: list[dict], *, max_pixels: int,
                     max_new: int = 8) -> list[dict]:
    """Greedy answers to `items` through `ovjax.generate` (one batch, KV cache, stop at <|im_end|>)
    -> [{"type", "question", "truth", "answer"}]."""
    import numpy as np
    from transformers import AutoTokenizer

    from ovjax.data import chat, images, synthetic
    from ovjax.generate import Generator

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    template = chat.ChatTemplate(tok, default_system="")
    prompts, pixels, grids = [], [], []
    for it in items:
        patches, grid = images.preprocess(synthetic.render(it["scene"]), max_pixels=max_pixels)
        prompt, _ = template.encode([{"role": "user", "content": "<image>\n" + it["question"]}], [grid],
                                    add_generation_prompt=True)
        prompts.append(np.asarray(prompt, np.int32))
        pixels.append(patches)
        grids.append(grid)
    stop = template.ids["im_end"]
    outs = Generator(model_cfg, params).generate(prompts, (np.concatenate(pixels), np.asarray(grids)),
                                                 max_new_tokens=max_new, stop_ids=(stop,),
                                                 pad_id=template.ids["endoftext"])
    return [{"type": it["type"], "question": it["question"], "truth": it["answer"],
             "answer": tok.decode([t for t in out if t != stop]).strip()} for it, out in zip(items, outs)]


def answer_grid(items: list[dict], answers: list[dict], path: pathlib.Path) -> None:
    """A PNG of the pictures, each titled with its question, the model's answer and the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ovjax.data import synthetic

    cols = 4
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, it, a in zip(axes.flat, items, answers):
        ax.imshow(synthetic.render(it["scene"]))
        ok = a["answer"] == a["truth"]
        ax.set_title(f"{a['question']}\nmodel: {a['answer'] or '(nothing)'}   truth: {a['truth']}", fontsize=8,
                     color="darkgreen" if ok else "darkred")
    fig.suptitle("ovjax demo: free (greedy) answers on held-out pictures", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(workdir: pathlib.Path, *, smoke: bool, fixture: pathlib.Path | None, seed: int = 0,
             log=print) -> dict:
    import jax

    from ovjax import checkpoint, config
    from ovjax import eval as eval_lib
    from ovjax.data import synthetic
    from ovjax.train import dataset, loop

    t0 = time.perf_counter()
    report: dict = {"workdir": str(workdir), "devices": jax.device_count(), "smoke": smoke, "seed": seed}
    if fixture is not None:
        log("== parity with the upstream implementation (ov15-tiny fixture)")
        report["parity"] = parity_report(fixture)
        for k, v in report["parity"].items():
            log(f"   {k}: {v}")
    prev, stages = None, {}
    for name in STAGES:
        overrides = [("train.progress", "lines"), ("train.seed", str(seed)), ("data.seed", str(seed))]
        overrides += [("init.from_checkpoint", str(prev))] if prev else []
        cfg = config.load(f"configs/demo.py:{'smoke_' if smoke else ''}{name}", overrides)
        t_data = time.perf_counter()
        cfg = dataset.with_synthetic_data(cfg, workdir / "data", log=log)
        tok_dir = cfg.data.tokenizer
        log(f"== {name}: {cfg.train.steps} steps on {cfg.data.synthetic} data, trainable {tuple(cfg.optim.trainable)}")
        data_s = time.perf_counter() - t_data
        summary = loop.run(cfg, workdir / name)
        stages[name] = {"steps": summary["step"], "final_loss": summary["loss"], "train_seconds": summary["seconds"],
                        "data_seconds": data_s, "samples_seen": summary["samples_seen"],
                        "supervised_tokens_seen": summary["supervised_tokens_seen"]}
        prev = workdir / name
    report["stages"] = stages
    report["model"] = {"params": _count(checkpoint.load_params(prev)), "vocab_size": cfg.model.text.vocab_size,
                       "text_hidden": cfg.model.text.hidden_size, "vision_hidden": cfg.model.vision.hidden_size}

    log("== held-out evaluation (answer scoring; control: image features zeroed)")
    e = cfg.answers

    def evaluate(params, n_per_answer):
        return eval_lib.synthetic_eval(cfg.model, params, tok_dir, n_per_answer=n_per_answer, seed=e.seed,
                                       seq_len=e.seq_len, max_patches=e.max_patches, batch=e.batch,
                                       max_pixels=cfg.data.max_pixels)

    result = evaluate(checkpoint.load_params(prev), e.n_per_answer)
    report.update(result)
    mid = e.image_check_step
    if mid:  # a checkpoint of stage 2 that configs/demo.py keeps
        r = evaluate(checkpoint.load_params(prev, step=mid), e.image_check_n_per_answer)
        report["stage2_mid"] = {"step": mid, "of_steps": cfg.train.steps, "accuracy_by_type": r["accuracy_by_type"],
                                "control_accuracy_by_type": r["control_accuracy_by_type"]}
    log("== the held-out questions answered by free generation (ovjax.generate, greedy)")
    final = checkpoint.load_params(prev)
    held = synthetic.eval_items(e.n_per_answer, e.seed)
    gen = []
    for i in range(0, len(held), e.batch):
        gen += generate_answers(cfg.model, final, tok_dir, held[i:i + e.batch], max_pixels=cfg.data.max_pixels)
    report["generation_accuracy_by_type"] = {
        t: sum(g["answer"] == g["truth"] for g in gen if g["type"] == t) / sum(g["type"] == t for g in gen)
        for t in result["accuracy_by_type"]}
    gen_items = generation_items(e.seed + 1)
    report["generation"] = generate_answers(cfg.model, final, tok_dir, gen_items, max_pixels=cfg.data.max_pixels)
    answer_grid(gen_items, report["generation"], workdir / "answers.png")
    report["answers_png"] = str(workdir / "answers.png")
    loss_plot(workdir, workdir / "loss.png")
    report["loss_plot"] = str(workdir / "loss.png")
    report["seconds"] = time.perf_counter() - t0
    report["criteria"] = criteria(result)
    report["diagnosis"] = diagnosis(report)
    return report


def _count(params) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def criteria(result: dict) -> dict:
    by, ctrl, chance = result["accuracy_by_type"], result["control_accuracy_by_type"], result["chance_by_type"]
    out = {f"{t}_accuracy_ge_{THRESHOLD}": by.get(t, 0.0) >= THRESHOLD for t in REQUIRED}
    out.update({f"control_{t}_le_chance_plus_{CONTROL_MARGIN}": ctrl[t] <= chance[t] + CONTROL_MARGIN for t in ctrl})
    return out


def image_gain(result: dict) -> dict:
    """Per type: accuracy with the image minus accuracy with the image features zeroed."""
    return {t: a - result["control_accuracy_by_type"][t] for t, a in result["accuracy_by_type"].items()}


def diagnosis(r: dict) -> list[str]:
    """Sentences on where the model did not learn to use the image (empty when it did everywhere)."""
    out = []
    mid = r.get("stage2_mid")
    if mid is not None:
        gain = image_gain(mid)
        if max(gain.values()) < IMAGE_USE_GAIN:
            ctrl = mid["control_accuracy_by_type"]
            accs = ", ".join(f"{t} {mid['accuracy_by_type'][t]:.0%} (zero-image {ctrl[t]:.0%})" for t in gain)
            out.append(f"Stage 2 had not learned to use the image by step {mid['step']} of {mid['of_steps']}: "
                       f"no question type scores {IMAGE_USE_GAIN:.0%} better with the image than with it zeroed "
                       f"({accs}). It sat in the image-blind state (answers guessed from the question alone) "
                       "for at least half its steps; a gentler start of stage 2 (longer warmup, lower peak lr) "
                       "avoids it.")
    chance = r["chance_by_type"]
    for t, g in image_gain(r).items():
        acc, ctrl = r["accuracy_by_type"][t], r["control_accuracy_by_type"][t]
        if g < CONTROL_MARGIN:
            out.append(f"At the end, {t} questions do not use the image: {acc:.0%} with it, {ctrl:.0%} with it "
                       f"zeroed, chance {chance[t]:.0%}.")
        elif t in REQUIRED and acc < THRESHOLD:
            out.append(f"At the end, {t} questions use the image but only partly: {acc:.0%} "
                       f"(zero-image {ctrl:.0%}, needed {THRESHOLD:.0%}).")
    for t, ctrl in r["control_accuracy_by_type"].items():
        if ctrl > chance[t] + CONTROL_MARGIN:
            out.append(f"With the image zeroed, {t} still scores {ctrl:.0%} (chance {chance[t]:.0%}): the answers "
                       "leak through the question or a bias, not the image.")
    return out


def print_report(r: dict, log=print) -> None:
    log("")
    log("== ovjax demo report")
    log(f"   {'type':<10}{'accuracy':>10}{'generated':>11}{'control':>10}{'chance':>10}{'n':>6}")
    gen = r.get("generation_accuracy_by_type", {})
    for t, acc in r["accuracy_by_type"].items():
        log(f"   {t:<10}{acc:>10.1%}{gen.get(t, float('nan')):>11.1%}{r['control_accuracy_by_type'][t]:>10.1%}"
            f"{r['chance_by_type'][t]:>10.1%}{r['n_by_type'][t]:>6}")
    log("   (accuracy: the best-scoring candidate answer; generated: the greedy answer of ovjax.generate)")
    log(f"   {'all':<10}{r['accuracy']:>10.1%}{r['control_accuracy']:>10.1%}")
    for name, s in r["stages"].items():
        log(f"   {name}: {s['steps']} steps, final loss {s['final_loss']:.4f}, {s['train_seconds']:.0f} s, "
            f"{s['samples_seen']} samples")
    log(f"   model {r['model']['params']:,} params on {r['devices']} CPU devices; loss curve {r['loss_plot']}")
    log(f"   free answers (greedy) on held-out pictures, shown in {r['answers_png']}:")
    for i, g in enumerate(r["generation"], 1):
        log(f"     [{i}] {g['question']} -> {g['answer'] or '(nothing)'!r}   truth {g['truth']!r}"
            f"{'' if g['answer'] == g['truth'] else '   (wrong)'}")
    if "stage2_mid" in r:
        m = r["stage2_mid"]
        ctrl = m["control_accuracy_by_type"]
        log(f"   stage 2 at step {m['step']}: " + ", ".join(
            f"{t} {a:.0%} (zero-image {ctrl[t]:.0%})" for t, a in m["accuracy_by_type"].items()))
    for k, ok in r["criteria"].items():
        log(f"   {'PASS' if ok else 'FAIL'}  {k}")
    for sentence in r["diagnosis"]:
        log(f"   NOTE  {sentence}")
    log(f"   total {r['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m ovjax demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0,
                        help="model init, training data and its order (the held-out set stays the same)")
    parser.add_argument("--workdir", type=pathlib.Path, default=None,
                        help="run directory (default: a new temporary one); also gets report.json")
    parser.add_argument("--devices", type=int, default=4, help="fake CPU devices of the mesh (even)")
    parser.add_argument("--smoke", action="store_true", help="a few steps per stage: checks the pipeline only")
    parser.add_argument("--fixture", type=pathlib.Path, default=DEFAULT_FIXTURE)
    parser.add_argument("--no-parity", action="store_true", help="skip the fixture parity section")
    args = parser.parse_args(argv)
    if args.devices < 2 or args.devices % 2:
        parser.error("--devices must be an even number >= 2 (the demo mesh is data=2 x fsdp=devices/2)")
    _ensure_devices(args.devices, argv)
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="ovjax-demo-"))
    workdir = workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    fixture = None
    if not args.no_parity:
        if (args.fixture / "model.safetensors").exists():
            fixture = args.fixture
        else:
            print(f"(parity section skipped: no fixture at {args.fixture})")
    report = run_demo(workdir, smoke=args.smoke, fixture=fixture, seed=args.seed)
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"   report {workdir / 'report.json'}")
    if args.smoke:
        return 0
    parity_ok = "parity" not in report or max(report["parity"]["image_logits_max_abs_diff"],
                                              report["parity"]["text_logits_max_abs_diff"]) <= 1e-4
    return 0 if parity_ok and all(report["criteria"].values()) else 1
