"""`python -m ovjax synth`: the verb that makes the synthetic set, and the same set `train` makes up front."""

from __future__ import annotations

from pathlib import Path

from ovjax import config
from ovjax.data import synthetic


def test_verb_makes_the_set_the_run_config_asks_for(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--config", "configs/stage2.py:tiny", "--config.data.synthetic_samples=12",
            "--max-turns", "2"]
    assert synthetic.main(argv) == 0
    out = dict(line.split(" ", 1) for line in capsys.readouterr().out.strip().splitlines()[-2:])
    packed, tok = Path(out["packed"]), Path(out["tokenizer"])
    assert (packed / "manifest.json").exists() and (tok / "tokenizer.json").exists()
    cfg = config.load("configs/stage2.py:tiny", [("data.synthetic_samples", "12"), ("data.synthetic_max_turns", "2")])
    spec = synthetic.spec_for_run(cfg, tmp_path)
    assert (spec.kind, spec.samples, spec.seq_len, spec.max_patches, spec.max_turns) == ("qa", 12, 64, 64, 2)
    assert spec.command().startswith(f"python -m ovjax synth --out {tmp_path} --kind qa --samples 12 ")
    # the function `train` calls up front finds the same set and makes nothing
    def no_log(*a):
        raise AssertionError(f"the set was made again: {a}")
    assert synthetic.make(spec, log=no_log) == (packed, tok)


def test_verb_errors(tmp_path, capsys):
    assert synthetic.main(["--out", str(tmp_path), "--kind", "bogus"]) == 2
    assert "--kind must be caption or qa, got 'bogus'" in capsys.readouterr().err
    assert synthetic.main(["--out", str(tmp_path), "--seq-len", "0"]) == 2
    assert "--seq-len must be >= 1" in capsys.readouterr().err
    assert synthetic.main(["--out", str(tmp_path), "--config.train.steps=3"]) == 2
    assert "need --config" in capsys.readouterr().err
