"""`python -m ovjax demo`: the embedded end-to-end demo.

Until the training runs land, the demo is a parity report: it imports the ov15-tiny fixture (made by the
upstream implementation), compares our logits with the upstream's, exports the model to the hub layout,
re-imports it and checks the round trip.
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
        "fixture": str(fixture),
        "image_logits_max_abs_diff": float(np.abs(image - case["logits"]).max()),
        "text_logits_max_abs_diff": float(np.abs(text - case["text_logits"]).max()),
        "export_round_trip_max_abs_diff": float(np.abs(round_trip - text).max()),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ovjax demo", description=__doc__)
    parser.add_argument("--fixture", type=pathlib.Path, default=DEFAULT_FIXTURE)
    parser.add_argument("--workdir", type=pathlib.Path, default=None, help="also write DIR/report.json")
    args = parser.parse_args(argv)
    if not (args.fixture / "model.safetensors").exists():
        print(f"fixture not found at {args.fixture} (pass --fixture)", file=sys.stderr)
        return 2
    report = parity_report(args.fixture)
    for key, value in report.items():
        print(f"{key:>32}: {value}")
    ok = max(report["image_logits_max_abs_diff"], report["text_logits_max_abs_diff"]) <= 1e-4
    print("parity:", "OK (<= 1e-4)" if ok else "FAILED")
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        (args.workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1
