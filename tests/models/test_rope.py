"""Our rotary embeddings equal transformers' Qwen3 rotary (rotate-half) on random inputs."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.qwen3 import modeling_qwen3  # noqa: E402

from ovjax.models import rope  # noqa: E402


@pytest.mark.parametrize("head_dim,theta", [(16, 5e6), (128, 1e6), (64, 10000.0)])
def test_text_rotary_matches_qwen3(head_dim, theta):
    cfg = transformers.Qwen3Config(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                   rope_parameters={"rope_type": "default", "rope_theta": theta})
    rotary = modeling_qwen3.Qwen3RotaryEmbedding(cfg)
    rs = np.random.RandomState(head_dim)
    positions = np.stack([rs.permutation(300)[:40], np.arange(40) + 5000])  # [2, 40], large positions too
    q = rs.randn(2, 3, 40, head_dim).astype(np.float32)  # torch layout [B, H, T, D]
    k = rs.randn(2, 3, 40, head_dim).astype(np.float32)
    with torch.no_grad():
        cos, sin = rotary(torch.tensor(q), torch.tensor(positions))
        q_ref, k_ref = modeling_qwen3.apply_rotary_pos_emb(torch.tensor(q), torch.tensor(k), cos, sin)

    c, s = rope.cos_sin(rope.text_angles(jnp.asarray(positions), head_dim, theta))
    q_ours = rope.apply_rotary(jnp.asarray(q.transpose(0, 2, 1, 3)), c, s)
    k_ours = rope.apply_rotary(jnp.asarray(k.transpose(0, 2, 1, 3)), c, s)
    np.testing.assert_allclose(np.asarray(q_ours).transpose(0, 2, 1, 3), q_ref.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(k_ours).transpose(0, 2, 1, 3), k_ref.numpy(), atol=1e-4, rtol=1e-4)


def test_vision_angles_layout():
    """Hand-checked: head_dim 8 -> 2 frequencies 1 and 1/100 (theta 1e4, dim 4); angles [h*f, w*f]."""
    angles = np.asarray(rope.vision_angles(jnp.array([[3, 5]]), head_dim=8, theta=10000.0))
    np.testing.assert_allclose(angles, [[3.0, 0.03, 5.0, 0.05]], rtol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope.vision_angles(jnp.array([[1, 1]]), head_dim=6)
