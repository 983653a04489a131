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
5. DIR/loss.png (the loss of the three stages), DIR/report.json and a short printed report.

    python -m ovjax demo [--workdir DIR] [--devices 4] [--smoke] [--no-parity]

Exit status 0 when colour and count reach 90% and every control type stays within chance + 10 points
(--smoke: when the pipeline ran). Rerunning with the same --workdir reuses finished stages.
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


def run_demo(workdir: pathlib.Path, *, smoke: bool, fixture: pathlib.Path | None, log=print) -> dict:
    import jax

    from ovjax import checkpoint, config
    from ovjax import eval as eval_lib
    from ovjax.train import dataset, loop

    t0 = time.perf_counter()
    report: dict = {"workdir": str(workdir), "devices": jax.device_count(), "smoke": smoke}
    if fixture is not None:
        log("== parity with the upstream implementation (ov15-tiny fixture)")
        report["parity"] = parity_report(fixture)
        for k, v in report["parity"].items():
            log(f"   {k}: {v}")
    prev, stages = None, {}
    for name in STAGES:
        overrides = [("train.progress", "lines")] + ([("init.from_checkpoint", str(prev))] if prev else [])
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
    params = checkpoint.load_params(prev)
    e = cfg.eval
    result = eval_lib.synthetic_eval(cfg.model, params, tok_dir, n_per_answer=e.n_per_answer, seed=e.seed,
                                     seq_len=e.seq_len, max_patches=e.max_patches, batch=e.batch,
                                     max_pixels=cfg.data.max_pixels)
    report.update(result)
    loss_plot(workdir, workdir / "loss.png")
    report["loss_plot"] = str(workdir / "loss.png")
    report["seconds"] = time.perf_counter() - t0
    report["criteria"] = criteria(result)
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


def print_report(r: dict, log=print) -> None:
    log("")
    log("== ovjax demo report")
    log(f"   {'type':<10}{'accuracy':>10}{'control':>10}{'chance':>10}{'n':>6}")
    for t, acc in r["accuracy_by_type"].items():
        log(f"   {t:<10}{acc:>10.1%}{r['control_accuracy_by_type'][t]:>10.1%}{r['chance_by_type'][t]:>10.1%}"
            f"{r['n_by_type'][t]:>6}")
    log(f"   {'all':<10}{r['accuracy']:>10.1%}{r['control_accuracy']:>10.1%}")
    for name, s in r["stages"].items():
        log(f"   {name}: {s['steps']} steps, final loss {s['final_loss']:.4f}, {s['train_seconds']:.0f} s, "
            f"{s['samples_seen']} samples")
    log(f"   model {r['model']['params']:,} params on {r['devices']} CPU devices; loss curve {r['loss_plot']}")
    for k, ok in r["criteria"].items():
        log(f"   {'PASS' if ok else 'FAIL'}  {k}")
    log(f"   total {r['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m ovjax demo", description=__doc__.split("\n\n")[0])
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
    report = run_demo(workdir, smoke=args.smoke, fixture=fixture)
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"   report {workdir / 'report.json'}")
    if args.smoke:
        return 0
    parity_ok = "parity" not in report or max(report["parity"]["image_logits_max_abs_diff"],
                                              report["parity"]["text_logits_max_abs_diff"]) <= 1e-4
    return 0 if parity_ok and all(report["criteria"].values()) else 1
