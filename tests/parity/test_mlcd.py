"""Our vision tower equals transformers' MLCDVisionModel (the same network as RICE-ViT) on one image."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ovjax.configs import models as model_configs  # noqa: E402
from ovjax.hf import vision_config_from_mlcd, vision_params_from_mlcd  # noqa: E402
from ovjax.models.vision import VisionTower  # noqa: E402
from ovjax.models.vlm import patch_positions  # noqa: E402

PATCH = 14


@pytest.fixture(scope="module")
def mlcd():
    torch.manual_seed(0)
    cfg = transformers.MLCDVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=56,
        patch_size=PATCH, rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
    )
    model = transformers.MLCDVisionModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def image_to_block_patches(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """image [3, H, W] -> patch rows [h*w, 588] in the 2x2-block order, grid (1, h, w)."""
    c, hh, ww = image.shape
    h, w = hh // PATCH, ww // PATCH
    rows = image.reshape(c, h, PATCH, w, PATCH).transpose(1, 3, 0, 2, 4).reshape(h * w, c * PATCH * PATCH)
    pos = patch_positions((1, h, w))
    return rows[pos[:, 0] * w + pos[:, 1]], (1, h, w)


@pytest.mark.parametrize("size", [(56, 84), (84, 28)])
def test_vision_tower_matches_mlcd(mlcd, size):
    image = np.random.RandomState(size[0]).randn(3, *size).astype(np.float32)
    with torch.no_grad():
        ref = mlcd(torch.tensor(image[None])).last_hidden_state[0].numpy()  # [1 + h*w, D], CLS first

    state = {k: v.numpy() for k, v in mlcd.state_dict().items()}
    vcfg = vision_config_from_mlcd(mlcd.config.to_dict(), out_hidden=32)
    params = vision_params_from_mlcd(state, vcfg)
    rows, grid = image_to_block_patches(image)
    pos = patch_positions(grid)
    tower = VisionTower(ml_collections.FrozenConfigDict(vcfg))
    out = tower.apply({"params": jax.tree_util.tree_map(jnp.asarray, params)}, jnp.asarray(rows[None]),
                      jnp.ones((1, len(rows)), jnp.int32), jnp.asarray(pos[None]), num_images=1)
    out = np.asarray(out[0])
    _, h, w = grid
    expected = ref[1:][pos[:, 0] * w + pos[:, 1]]  # MLCD patches are row-major; ours 2x2-block order
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() <= 1e-4


def test_stage0_assembly_from_mlcd_and_qwen3(mlcd, tmp_path):
    from ovjax.hf import assemble_stage0
    torch.manual_seed(1)
    qcfg = transformers.Qwen3Config(vocab_size=151700, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    tie_word_embeddings=False)
    llm = transformers.Qwen3ForCausalLM(qcfg).eval()
    llm.save_pretrained(tmp_path / "llm")
    mlcd.save_pretrained(tmp_path / "vit")
    model = assemble_stage0(str(tmp_path / "vit"), str(tmp_path / "llm"))
    ids = np.array([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = llm(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(model.logits(ids)) - expected).max() <= 1e-4
    assert model.cfg.image_token_id == model_configs.QWEN_TOKENS["image_token_id"]
    assert model.params["merger"]["fc2"]["kernel"].shape == (4 * 32, 32)
