"""The stage recipes' row budgets accept the packed sets their docstrings' `pack` lines make (the loader's
manifest budget check), and stage 1 rows may hold 64 caption samples."""

from __future__ import annotations

import re

import pytest

from ovjax import config
from ovjax.data import loader


def _pack_line_budgets(path: str) -> dict:
    """The budgets of the `python -m ovjax pack ...` line in a config file's docstring."""
    text = open(path).read().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if "ovjax pack" in x)
    flags = dict(re.findall(r"--([a-z-]+) (\d+)", line))
    return {k.replace("-", "_"): int(v) for k, v in flags.items() if k in ("seq-len", "max-patches", "max-images",
                                                                         "max-segments")}


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
@pytest.mark.parametrize("preset", ["4b", "8b"])
def test_documented_pack_budgets_load(stage, preset):
    cfg = config.load(f"configs/{stage}.py:{preset}")
    t = cfg.train
    spec = loader.RowSpec(t.seq_len, t.max_patches, t.max_images, t.max_segments or None, 14, 2, 3136, 2560000)
    budgets = _pack_line_budgets(f"configs/{stage}.py")
    assert budgets["seq_len"] == t.seq_len and len(budgets) == 4
    loader._check_manifest_budgets({"parameters": budgets}, spec)  # raises LoaderError when refused
    with pytest.raises(loader.LoaderError, match="max_patches"):
        loader._check_manifest_budgets({"parameters": {**budgets, "max_patches": t.max_patches + 1}}, spec)


def test_stage1_rows_hold_the_token_budget():
    t = config.load("configs/stage1.py:8b").train
    assert t.max_images == 64 and t.max_patches == 4 * t.seq_len == 32768
