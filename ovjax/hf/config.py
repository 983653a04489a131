"""config.json <-> our model config (configs/models.py schema).

Reads the LLaVA-OV-1.5 remote-code layout (`llavaonevision1_5`), the native port's (`llava_onevision1_5`),
plain Qwen3 and MLCD vision configs. Every key that changes the network is either mapped or refused with
one line when it holds a value ovjax does not implement (rope scaling, attention bias, sliding windows,
activations). Writing derives sizes from the tensors and constants from the config, in the released
checkpoints' layout, with their `auto_map`.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from ovjax.configs import models as model_configs
from ovjax.hf.files import CheckpointError

LLAVA_TYPES = ("llavaonevision1_5", "llava_onevision1_5")

# The released checkpoints' `auto_map`, as bare "module.Class" names: they name files that would sit in the
# exported directory itself, so nothing here points transformers at code to download from another repository.
AUTO_MAP = {
    "AutoConfig": "configuration_llavaonevision1_5.Llavaonevision1_5Config",
    "AutoModel": "modeling_llavaonevision1_5.LLaVAOneVision1_5_ForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_llavaonevision1_5.LLaVAOneVision1_5_ForConditionalGeneration",
}


def _refuse(where: str, key: str, value, allowed: str):
    raise CheckpointError(f"{where}: {key}={value!r} is not supported by ovjax ({allowed})")


def check_text_config(text: dict, where: str = "text config") -> None:
    """Refuse keys that hold a value the Qwen3 implementation here does not compute."""
    scaling = text.get("rope_scaling")
    if scaling not in (None, {}) and (not isinstance(scaling, dict)
                                      or scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        _refuse(where, "rope_scaling", scaling, "plain RoPE only")
    params = text.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_type", "default") != "default":
        _refuse(where, "rope_parameters.rope_type", params.get("rope_type"), "plain RoPE only")
    if text.get("attention_bias", False):
        _refuse(where, "attention_bias", text["attention_bias"], "Qwen3 has no q/k/v/o biases")
    if text.get("hidden_act", "silu") != "silu":
        _refuse(where, "hidden_act", text["hidden_act"], "SwiGLU with silu only")
    if text.get("use_sliding_window", False):
        _refuse(where, "use_sliding_window", True, "full attention in every layer")
    layer_types = text.get("layer_types")
    if layer_types is not None:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            _refuse(where, "layer_types", other, "full_attention only")
        if len(layer_types) != text.get("num_hidden_layers", len(layer_types)):
            raise CheckpointError(f"{where}: layer_types lists {len(layer_types)} layers, "
                                  f"num_hidden_layers is {text.get('num_hidden_layers')}")


def tied_embeddings(hf: dict) -> bool:
    """Whether the LM head is the embedding matrix. Like transformers (>= 4.5x, `get_text_config(decoder=True)`),
    a composite config decides from `text_config` when it says; the top-level key is the fallback."""
    text = hf.get("text_config") or {}
    if "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    return bool(hf.get("tie_word_embeddings", False))


def config_from_hf(hf: dict, where: str = "config.json") -> ml_collections.ConfigDict:
    """Our model config from a hub config.json (LLaVA-OV-1.5 remote-code or native layout, or Qwen3)."""
    mt = hf.get("model_type")
    if mt == "qwen3":
        text_hf, vision_hf = hf, None
    elif mt in LLAVA_TYPES:
        text_hf, vision_hf = hf.get("text_config") or {}, hf.get("vision_config") or {}
    else:
        raise CheckpointError(f"{where}: unsupported model_type {mt!r} (expected {', '.join(LLAVA_TYPES)} or qwen3)")
    check_text_config(text_hf, f"{where} text config")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if k not in text_hf]
    if missing:
        raise CheckpointError(f"{where}: text config lacks {missing}")
    cfg = model_configs.tiny()
    theta = text_hf.get("rope_theta") or (text_hf.get("rope_parameters") or {}).get("rope_theta")
    if theta is None:
        raise CheckpointError(f"{where}: text config has no rope_theta / rope_parameters.rope_theta")
    heads = text_hf["num_attention_heads"]
    cfg.text = model_configs._text(
        vocab=text_hf["vocab_size"], hidden=text_hf["hidden_size"], layers=text_hf["num_hidden_layers"],
        heads=heads, kv_heads=text_hf.get("num_key_value_heads", heads),
        head_dim=text_hf.get("head_dim") or text_hf["hidden_size"] // heads,
        mlp=text_hf["intermediate_size"], theta=float(theta), max_pos=text_hf.get("max_position_embeddings", 32768))
    cfg.text.rms_norm_eps = float(text_hf.get("rms_norm_eps", 1e-6))
    cfg.text.tie_word_embeddings = tied_embeddings(hf)
    cfg.name = hf.get("_name_or_path") or mt
    if vision_hf is None:
        cfg.vision = None
        return cfg
    vh = vision_hf.get("num_heads") or vision_hf.get("num_attention_heads")
    out = vision_hf.get("text_hidden_size") or vision_hf.get("out_hidden_size") or cfg.text.hidden_size
    cfg.vision = model_configs._vision(depth=vision_hf["depth"], hidden=vision_hf["hidden_size"], heads=vh,
                                       mlp=vision_hf["intermediate_size"], out_hidden=out)
    cfg.vision.patch_size = vision_hf.get("patch_size", 14)
    cfg.vision.in_channels = vision_hf.get("in_channels", 3)
    cfg.vision.temporal_patch_size = vision_hf.get("temporal_patch_size", 1)
    cfg.vision.spatial_merge_size = vision_hf.get("spatial_merge_size", 2)
    cfg.vision.layer_norm_eps = float(vision_hf.get("layer_norm_eps", 1e-5))
    if vision_hf.get("hidden_act", "gelu") != "gelu":
        _refuse(f"{where} vision config", "hidden_act", vision_hf.get("hidden_act"), "exact gelu only")
    cfg.image_token_id = hf.get("image_token_id", 151655)
    cfg.video_token_id = hf.get("video_token_id", 151656)
    cfg.vision_start_token_id = hf.get("vision_start_token_id", 151652)
    # Qwen's vocabulary puts <|vision_end|> right after <|vision_start|>; config files often omit it.
    cfg.vision_end_token_id = hf.get("vision_end_token_id", cfg.vision_start_token_id + 1)
    return cfg


def vision_config_from_mlcd(hf: dict, out_hidden: int, where: str = "MLCD config.json") -> ml_collections.ConfigDict:
    """The `vision` section from a transformers MLCDVisionConfig (or a CLIP-style config holding one)."""
    hf = hf.get("vision_config", hf)
    if hf.get("model_type", "mlcd_vision_model") not in ("mlcd_vision_model", "mlcd"):
        raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r} is not an MLCD vision model")
    v = model_configs._vision(depth=hf["num_hidden_layers"], hidden=hf["hidden_size"], heads=hf["num_attention_heads"],
                              mlp=hf["intermediate_size"], out_hidden=out_hidden)
    v.patch_size = hf.get("patch_size", 14)
    v.in_channels = hf.get("num_channels", 3)
    v.layer_norm_eps = float(hf.get("layer_norm_eps", 1e-5))
    v.rope_theta = float((hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    if hf.get("hidden_act", "gelu") != "gelu":
        _refuse(where, "hidden_act", hf.get("hidden_act"), "exact gelu only")
    return v


def config_to_hf(cfg, shapes, *, dtype_name: str) -> dict:
    """A hub config.json: sizes from the param shapes (`shapes`: a param-shaped tree of objects with .shape),
    constants from cfg, in the fixture's (remote-code) layout with the released `auto_map`."""
    lm = shapes["language_model"]
    vocab, hidden = lm["embed_tokens"].shape
    layers = lm["layers"]
    n_layers, _, hq, hd = layers["q_proj"]["kernel"].shape
    hkv = layers["k_proj"]["kernel"].shape[2]
    inter = layers["gate_proj"]["kernel"].shape[2]
    t = cfg.text
    tied = "lm_head" not in lm
    text = {
        "attention_bias": False, "attention_dropout": 0.0, "head_dim": int(hd), "hidden_act": "silu",
        "hidden_size": int(hidden), "initializer_range": 0.02, "intermediate_size": int(inter),
        "layer_types": ["full_attention"] * int(n_layers), "max_position_embeddings": int(t.max_position_embeddings),
        "num_attention_heads": int(hq), "num_hidden_layers": int(n_layers), "num_key_value_heads": int(hkv),
        "rms_norm_eps": float(t.rms_norm_eps), "rope_theta": float(t.rope_theta), "sliding_window": None,
        "use_cache": True, "use_sliding_window": False, "vocab_size": int(vocab),
    }
    if "visual" not in shapes:
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "dtype": dtype_name,
                "tie_word_embeddings": tied,
                "rope_parameters": {"rope_type": "default", "rope_theta": float(t.rope_theta)},
                **text}
    vis = shapes["visual"]
    depth, d = vis["blocks"]["norm1"]["scale"].shape
    vhd = vis["class_pos_emb"].shape[1] * 2
    v = cfg.vision
    vision = {
        "depth": int(depth), "embed_dim": int(d), "hidden_act": "gelu", "hidden_size": int(d),
        "in_channels": int(v.in_channels), "initializer_range": 0.02,
        "intermediate_size": int(vis["blocks"]["fc1"]["kernel"].shape[2]), "layer_norm_eps": float(v.layer_norm_eps),
        "model_type": "rice_vit", "num_heads": int(d // vhd), "patch_size": int(v.patch_size),
        "spatial_merge_size": int(v.spatial_merge_size), "temporal_patch_size": int(v.temporal_patch_size),
        "text_hidden_size": int(shapes["merger"]["fc2"]["kernel"].shape[1]),
    }
    # Tying is stated in text_config too: transformers decides from there, so both places must agree.
    text.update({"model_type": "LLaVAOneVision1_5_text", "rope_scaling": None, "tie_word_embeddings": tied,
                 "image_token_id": None, "video_token_id": None})
    return {"architectures": ["LLaVAOneVision1_5_ForConditionalGeneration"], "auto_map": dict(AUTO_MAP),
            "dtype": dtype_name, "image_token_id": int(cfg.image_token_id), "model_type": "llavaonevision1_5",
            "text_config": text, "tie_word_embeddings": tied, "video_token_id": int(cfg.video_token_id),
            "vision_config": vision, "vision_start_token_id": int(cfg.vision_start_token_id),
            "vision_end_token_id": int(cfg.vision_end_token_id), "vocab_size": int(vocab)}


def dtype_name(dtype) -> str:
    dt = np.dtype(dtype)
    return "bfloat16" if dt.name == "bfloat16" else dt.name
