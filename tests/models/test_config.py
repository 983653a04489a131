"""Model presets carry the spec's numbers; validation names the offending field."""

import pytest

from ovjax.configs import models as model_configs
from ovjax.models.vlm import abstract_params


def count(cfg, prefix):
    import jax
    import numpy as np
    tree = abstract_params(cfg)[prefix]
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name,llm,merger", [("4b", 4.411e9, 27.3e6), ("8b", 8.191e9, 33.6e6)])
def test_preset_parameter_counts_match_spec(name, llm, merger):
    """spec/model.md section 4: LLM 4.411 B / 8.191 B (both embedding matrices), ViT ~302.9 M, merger 27.3 / 33.6 M."""
    cfg = model_configs.preset(name)
    assert abs(count(cfg, "language_model") - llm) / llm < 1e-3
    assert abs(count(cfg, "visual") - 302.9e6) / 302.9e6 < 2e-3
    assert abs(count(cfg, "merger") - merger) / merger < 2e-3


@pytest.mark.parametrize("field,value,message", [
    ("text.num_kv_heads", 3, "not divisible by text.num_kv_heads"),
    ("vision.num_heads", 5, "not divisible by vision.num_heads"),
    ("vision.out_hidden_size", 65, "out_hidden_size"),
    ("image_token_id", 10_000, "outside the vocabulary"),
    ("attention_impl", "magic", "attention_impl"),
    ("text.hidden_size", 0, "positive int"),
])
def test_validation_names_the_problem(field, value, message):
    cfg = model_configs.tiny()
    section, _, key = field.rpartition(".")
    (cfg[section] if section else cfg)[key] = value
    with pytest.raises(model_configs.ConfigError, match=message):
        model_configs.validate(cfg)


def test_grid_check_and_unknown_preset():
    cfg = model_configs.tiny()
    model_configs.check_grid(cfg, (1, 4, 6))
    with pytest.raises(model_configs.ConfigError, match="divisible by the merge size"):
        model_configs.check_grid(cfg, (1, 3, 4))
    with pytest.raises(ValueError, match="unknown model preset"):
        model_configs.preset("70b")
