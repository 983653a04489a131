"""ovjax.data.plan: the pure planner (lengths in, bins out) within budgets and near the lower bound."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest

from ovjax.data import plan as planner
from tests.data.test_pack import BUDGETS


def test_plan_hand_case_is_exact():
    # 8+8 / 4+4+4+4 / 2*8: the lower bound (3 bins of 16) is reachable and best fit reaches it.
    lengths = [8, 4, 2, 2, 4, 8, 2, 2, 4, 2, 2, 4, 2, 2]
    plan = planner.plan_bins(lengths, budgets=planner.Budgets(16), seed=3)
    assert plan.num_bins == 3
    assert sorted(sum(lengths[i] for i in b) for b in plan.bins()) == [16, 16, 16]
    assert sorted(i for b in plan.bins() for i in b) == list(range(len(lengths)))


def _check_independently(plan, tok, pat, img, b: planner.Budgets):
    seen = collections.Counter(int(i) for bin_ in plan.bins() for i in bin_)
    assert seen == collections.Counter(range(len(tok)))
    for bin_ in plan.bins():
        assert 1 <= len(bin_) <= (b.max_segments or 10**9)
        assert sum(tok[i] for i in bin_) <= b.seq_len
        assert sum(pat[i] for i in bin_) <= (b.max_patches or 10**12)
        assert sum(img[i] for i in bin_) <= (b.max_images or 10**9)


@pytest.mark.parametrize("budgets", [
    planner.Budgets(512),
    planner.Budgets(512, max_patches=1024, max_segments=16, max_images=8),
    planner.Budgets(512, max_patches=300, max_segments=6, max_images=2),   # patches and images bind
    planner.Budgets(512, max_patches=2048, max_segments=3, max_images=64),  # segments bind
])
def test_plan_respects_budgets_and_is_near_the_lower_bound(budgets):
    rng = np.random.default_rng(0)
    n = 4000
    img = rng.integers(0, 3, n)
    pat = img * rng.integers(4, 60, n) * 4
    tok = (pat // 4 + 2 * img + rng.lognormal(3.5, 0.8, n).astype(int) + 1).clip(1, 512)
    keep = planner.reject_reasons(tok, pat, img, budgets) == None  # noqa: E711
    tok, pat, img = tok[keep], pat[keep], img[keep]
    plan = planner.plan_bins(tok, pat, img, budgets=budgets, seed=1)
    _check_independently(plan, tok.tolist(), pat.tolist(), img.tolist(), budgets)
    lb = max(math.ceil(tok.sum() / 512), math.ceil(pat.sum() / (budgets.max_patches or 1 << 40)),
             math.ceil(len(tok) / (budgets.max_segments or 1 << 40)),
             math.ceil(img.sum() / (budgets.max_images or 1 << 40)))
    assert plan.num_bins <= 1.06 * lb, (plan.num_bins, lb, plan.strategy)
    again = planner.plan_bins(tok, pat, img, budgets=budgets, seed=1)
    assert np.array_equal(again.items, plan.items) and np.array_equal(again.offsets, plan.offsets)


def test_plan_fill_on_a_realistic_token_mix():
    rng = np.random.default_rng(5)
    n = 30000
    tok = (rng.lognormal(6.5, 0.7, n).astype(int) + rng.lognormal(4.5, 0.7, n).astype(int) + 20).clip(1, 8192)
    plan = planner.plan_bins(tok, budgets=planner.Budgets(8192), seed=0)
    assert plan.num_bins <= math.ceil(tok.sum() / 8192) * 1.005


def test_reject_reasons_first_failing_budget():
    r = planner.reject_reasons([0, 65, 10, 10, 64, 70], [0, 0, 49, 0, 48, 49], [0, 0, 1, 4, 3, 4], BUDGETS)
    assert r.tolist() == ["empty", "too_many_tokens", "too_many_patches", "too_many_images", None,
                          "too_many_tokens"]
    with pytest.raises(planner.PackError, match="does not fit"):
        planner.plan_bins([65], budgets=BUDGETS)
