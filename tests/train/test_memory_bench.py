"""The AOT memory benchmark runs (smoke: tiny preset, 8 fake devices, in its own subprocess)."""

import json
import subprocess
import sys

from ovjax.configs.models import preset
from ovjax.models import vlm


def test_memory_bench_smoke(tmp_path):
    out = tmp_path / "mem.json"
    proc = subprocess.run([sys.executable, "-m", "ovjax.bench.memory", "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| case | mesh |" in proc.stdout and "tiny-fsdp8" in proc.stdout
    (r,) = json.loads(out.read_text())
    assert r["devices"] == 8 and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1}
    n = sum(x.size for x in __import__("jax").tree_util.tree_leaves(vlm.abstract_params(preset("tiny"))))
    assert r["param_count"] == n
    # fp32 params split 8 ways (small 1-D params partly replicated), fp32 Adam moments twice that
    assert 4 * n / 8 <= r["params_bytes"] <= 1.05 * 4 * n / 8
    assert 1.9 * r["params_bytes"] <= r["optimizer_bytes"] <= 2.0 * r["params_bytes"]
    assert r["argument_bytes"] >= r["params_bytes"] + r["optimizer_bytes"] + r["batch_bytes"]
    assert r["temp_bytes"] > 0 and r["fits_80GiB"]
    assert r["peak_bytes"] == r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
