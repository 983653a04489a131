"""`python -m ovjax assemble` (issue 11, must-show 3): from a tiny random MLCDVisionModel and tiny random
Qwen3ForCausalLMs (tied and untied) saved by transformers: the vision features equal MLCD's and, with no image,
the logits equal Qwen3's (1e-4); the head is untied in both cases."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import ovjax.hf as hf  # noqa: E402
from ovjax.hf import assemble_cmd  # noqa: E402
from ovjax.models.vlm import patch_positions  # noqa: E402

PATCH = 14


@pytest.fixture(scope="module")
def mlcd_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.MLCDVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=56, patch_size=PATCH)
    model = transformers.MLCDVisionModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("mlcd")
    model.save_pretrained(path)
    return path, model


def qwen3_dir(tmp_path, tied: bool):
    torch.manual_seed(1)
    cfg = transformers.Qwen3Config(vocab_size=151700, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   tie_word_embeddings=tied)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    path = tmp_path / f"qwen3-{'tied' if tied else 'untied'}"
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("tied", [False, True])
def test_assemble_matches_mlcd_and_qwen3(mlcd_dir, tmp_path, tied, capsys):
    vit_path, mlcd = mlcd_dir
    llm_path, llm = qwen3_dir(tmp_path, tied)
    out = tmp_path / "stage0"
    assert assemble_cmd.main(["--vision", str(vit_path), "--llm", str(llm_path), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False
    assert (out / "preprocessor_config.json").is_file() and (out / "chat_template.jinja").is_file()
    model = hf.load(out, remote_code_quirks=False)
    assert "lm_head" in model.params["language_model"]

    ids = np.random.RandomState(2).randint(0, 151700, size=(2, 9))
    with torch.no_grad():
        expected = llm(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(model.logits(ids)) - expected).max() <= 1e-4

    image = np.random.RandomState(3).randn(3, 56, 84).astype(np.float32)
    with torch.no_grad():
        ref = mlcd(torch.tensor(image[None])).last_hidden_state[0].numpy()   # [1 + h*w, D], CLS first
    h, w = 4, 6
    pos = patch_positions((1, h, w))
    rows = image.reshape(3, h, PATCH, w, PATCH).transpose(1, 3, 0, 2, 4).reshape(h * w, -1)[pos[:, 0] * w + pos[:, 1]]
    feats = model.module.apply({"params": model.params}, jnp.asarray(rows[None]), jnp.ones((1, h * w), jnp.int32),
                               jnp.asarray(pos[None]), 1, method=lambda m, *a: m.visual(*a))
    expected_feats = ref[1:][pos[:, 0] * w + pos[:, 1]]
    assert np.abs(np.asarray(feats[0]) - expected_feats).max() <= 1e-4


def test_assemble_refuses_a_non_mlcd_vision_dir(tmp_path, capsys):
    llm_path, _ = qwen3_dir(tmp_path, False)
    capsys.readouterr()   # transformers' save progress bars
    assert assemble_cmd.main(["--vision", str(llm_path), "--llm", str(llm_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("assemble:") and "\n" not in err
