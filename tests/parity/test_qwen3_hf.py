"""A tiny random transformers Qwen3ForCausalLM: import -> logits, and our export -> from_pretrained -> logits."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import ovjax.hf  # noqa: E402


def tiny_qwen3(tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=tied,
    )
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms too, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("tied", [False, True])
def test_import_and_export_round_trip(tied, tmp_path):
    ref = tiny_qwen3(tied)
    src = tmp_path / "hf"
    ref.save_pretrained(src, safe_serialization=True)
    ids = np.random.RandomState(1).randint(0, 99, size=(2, 11))

    ours = ovjax.hf.load(src)
    expected = torch_logits(ref, ids)
    assert np.abs(np.asarray(ours.logits(ids)) - expected).max() <= 1e-4

    out = tmp_path / "export"
    ovjax.hf.save(ours, out)
    back = transformers.Qwen3ForCausalLM.from_pretrained(out).eval()
    assert back.config.tie_word_embeddings == tied
    assert np.abs(torch_logits(back, ids) - expected).max() <= 1e-4
