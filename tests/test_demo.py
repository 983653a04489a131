"""The demo: its stage chain, its pass/fail criteria, the loss plot, and a smoke run of the whole pipeline
(`python -m ovjax demo --smoke`: data, three stages on fake CPU devices, evaluation, report.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ovjax import config, demo

REPO = Path(__file__).resolve().parents[1]


def test_stage_chain():
    s1, s15, s2 = (config.load(f"configs/demo.py:{s}") for s in demo.STAGES)
    assert tuple(s1.optim.trainable) == ("merger",) and s1.data.synthetic == "caption"
    assert set(s15.optim.trainable) == {"visual", "merger", "language_model"} and s15.data.synthetic == "caption"
    assert set(s2.optim.trainable) == {"visual", "merger", "language_model"} and s2.data.synthetic == "qa"
    for c in (s1, s15, s2):
        assert c.model.to_dict() == s1.model.to_dict()  # one model through the stages
        assert c.mesh.data == 2
    with pytest.raises(ValueError, match="unknown stage"):
        config.load("configs/demo.py:stage3")


def _result(acc, ctrl):
    chance = {"colour": 1 / 6, "count": 1 / 4, "shape": 1 / 3, "position": 1 / 4}
    return {"accuracy_by_type": acc, "control_accuracy_by_type": ctrl, "chance_by_type": chance}


def test_criteria():
    good = _result({"colour": 1.0, "count": 0.95, "shape": 0.5, "position": 0.3},
                   {"colour": 0.2, "count": 0.25, "shape": 0.4, "position": 0.3})
    assert all(demo.criteria(good).values())
    weak_count = _result({"colour": 1.0, "count": 0.85, "shape": 0.5, "position": 0.3},
                         {"colour": 0.2, "count": 0.25, "shape": 0.4, "position": 0.3})
    assert demo.criteria(weak_count) == {**demo.criteria(good), "count_accuracy_ge_0.9": False}
    leaky = _result({"colour": 1.0, "count": 1.0, "shape": 0.5, "position": 0.3},
                    {"colour": 0.5, "count": 0.25, "shape": 0.4, "position": 0.3})
    assert not demo.criteria(leaky)["control_colour_le_chance_plus_0.1"]


def test_loss_plot(tmp_path):
    for i, name in enumerate(demo.STAGES):
        (tmp_path / name).mkdir()
        recs = [{"step": s, "loss": 5.0 / (s + i)} for s in range(1, 6)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    demo.loss_plot(tmp_path, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_run(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # the demo sets its own device count
    p = subprocess.run([sys.executable, "-m", "ovjax", "demo", "--smoke", "--no-parity", "--workdir", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("accuracy", "accuracy_by_type", "control_accuracy", "seconds"):
        assert key in report
    assert set(report["accuracy_by_type"]) == {"colour", "count", "shape", "position"}
    assert report["devices"] == 4
    assert [report["stages"][s]["steps"] for s in demo.STAGES] == [3, 3, 3]
    assert (tmp_path / "loss.png").exists()
    meta = json.loads((tmp_path / "stage2" / "config.json").read_text())
    assert meta["init"]["from_checkpoint"] == str(tmp_path / "stage1_5")
    assert "mesh data=2 x fsdp=2" in p.stdout
