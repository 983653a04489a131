"""Shared inputs of the balance tests: a tiny random transformers CLIPModel saved as safetensors, with a tokenizer."""

from __future__ import annotations

from pathlib import Path

from tests.data._make_inputs import make_tokenizer

IMAGE_SIZE = 32


def make_tiny_clip(out_dir: Path, seed: int = 0, *, hidden_act: str = "quick_gelu", weight_scale: float = 1.0) -> Path:
    """A random CLIPModel (2 layers per tower, 32 wide) saved with safetensors plus a small BPE tokenizer.

    The text tower's eos is the tokenizer's eos (<|im_end|>); the tokenizer does not append it, so the
    encoder appends it (as a real CLIP tokenizer would have). weight_scale multiplies the transformer layers'
    weight matrices: at the default init every image embeds almost alike (cosine ~0.98 on the synthetic
    scenes) and a few hub concepts win every retrieval; x6 spreads the embeddings like a trained encoder would."""
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    out_dir = Path(out_dir)
    make_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=24, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id, hidden_act=hidden_act),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, hidden_act=hidden_act),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and ".layers." in name:
                p.mul_(weight_scale)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
