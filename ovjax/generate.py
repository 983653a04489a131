"""Text generation with the KV cache: batched prompts, left padding, greedy or temperature/top-p sampling.

    python -m ovjax generate --model HFDIR_or_WORKDIR --prompt TEXT [--image PATH ...] [--max-new-tokens 64]
                             [--temperature 0.7 --top-p 0.9] [--seed 0]

Prompts are rendered with the Qwen2-VL chat template (`ovjax.data.chat.ChatTemplate`, image pads expanded to
each image's token count) and left-padded into one batch: pads sit in segment 0 (masked out of every
attention) and positions come from the mask (each prompt starts at 0), so a prompt's output does not depend on
what it is batched with. One prefill fills the cache, then one token per step for every row; a row stops at
`<|im_end|>` (or the end-of-text token). Images are resized to the checkpoint's processor pixel budget
(preprocessor_config.json of an HF directory, the run's data.min/max_pixels of a workdir). Images are encoded
as in training (CLS tokens stripped exactly; the remote code's quirk would make a row depend on its batch).

Logits [B, V] are float32; sampling: temperature 0 = greedy (argmax), else softmax(logits / T) restricted to
the smallest set of tokens whose probability reaches top_p.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ovjax.models.qwen3 import init_cache
from ovjax.models.vlm import VLM, freeze, upstream_to_batch


def left_pad(prompts: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token lists -> tokens, segment_ids (0 = pad), positions (from the mask), all int32 [B, L]."""
    length = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    segment = np.zeros((len(prompts), length), np.int32)
    for r, p in enumerate(prompts):
        tokens[r, length - len(p):] = p
        segment[r, length - len(p):] = 1
    positions = np.maximum(np.cumsum(segment, axis=1) - 1, 0).astype(np.int32)
    return tokens, segment, positions


def sample(logits, rng, temperature: float, top_p: float):
    """logits float32 [B, V] -> token ids int32 [B]."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass of the tokens ranked above each one
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)   # the top token always stays
    choice = jax.random.categorical(rng, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


class Generator:
    """cfg (model config) + params -> `generate(prompts, images)`; jitted prefill and decode step."""

    def __init__(self, cfg, params):
        cfg = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        if cfg.vision is not None:
            cfg.vision.remote_code_cls_shift = False
        self.cfg = freeze(cfg)
        self.params = params
        self.module = VLM(self.cfg)

    @functools.partial(jax.jit, static_argnames=("self", "num_images"))
    def _forward(self, params, tokens, positions, segment, cache, patches=None, patch_segment=None, patch_hw=None,
                 num_images: int = 0):
        hidden, cache = self.module.apply({"params": params}, tokens, positions, segment, patches, patch_segment,
                                          patch_hw, num_images=num_images, cache=cache)
        return self.module.apply({"params": params}, hidden[:, -1:], method=VLM.logits)[:, 0], cache

    def prefill(self, tokens, segment, positions, images=None, max_len: int = 0):
        """-> (last-position logits [B, V], cache). images: (pixel_values [N, 588], grid_thw [I, 3]) or None."""
        b, length = tokens.shape
        cache = init_cache(self.cfg.text, b, max(max_len, length), jnp.dtype(self.cfg.dtype))
        kw = {}
        if images is not None:
            merge = self.cfg.vision.spatial_merge_size
            batch = upstream_to_batch(tokens, images[0], images[1], image_token_id=self.cfg.image_token_id, merge=merge)
            kw = dict(patches=batch["patches"], patch_segment=batch["patch_segment"], patch_hw=batch["patch_hw"],
                      num_images=batch["num_images"])
        return self._forward(self.params, tokens, positions, segment, cache, **kw)

    def generate(self, prompts: list[np.ndarray], images=None, *, max_new_tokens: int = 64, stop_ids=(),
                 pad_id: int = 0, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 record_logits: list | None = None) -> list[list[int]]:
        """prompts: token id arrays (image pads expanded); images: (pixel_values, grid_thw) of all prompts'
        images in order, or None. Returns each row's new tokens, the stop token included when reached.
        record_logits: a list that receives the [B, V] logits each new token was chosen from."""
        tokens, segment, positions = left_pad([np.asarray(p, np.int32) for p in prompts], pad_id)
        b = len(prompts)
        logits, cache = self.prefill(tokens, segment, positions, images, tokens.shape[1] + max_new_tokens)
        next_pos = positions[:, -1] + 1
        rng = jax.random.PRNGKey(seed)
        out: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros(b, bool)
        stop = set(int(s) for s in stop_ids)
        for i in range(max_new_tokens):
            rng, key = jax.random.split(rng)
            if record_logits is not None:
                record_logits.append(np.asarray(logits))
            tok = np.asarray(sample(logits, key, temperature, top_p))
            for r in range(b):
                if not done[r]:
                    out[r].append(int(tok[r]))
                    done[r] = int(tok[r]) in stop
            if done.all() or i == max_new_tokens - 1:
                break
            step_tok = jnp.asarray(np.where(done, pad_id, tok)[:, None], jnp.int32)
            logits, cache = self._forward(self.params, step_tok, jnp.asarray((next_pos + i)[:, None], jnp.int32),
                                          jnp.ones((b, 1), jnp.int32), cache)
        return out


# ------------------------------------------------------------------------------------------------ command

def load_for_generation(path: str):
    """-> (cfg, params, tokenizer dir, (min_pixels, max_pixels)) from an HF directory or a run's workdir."""
    from ovjax.data import images as images_lib
    from ovjax.hf import sidefiles
    from ovjax.hf.export_cmd import _run_tokenizers, pixel_budget, run_config

    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(os.path.join(path, "checkpoints")):
        from ovjax.hf import load
        model = load(path, remote_code_quirks=False)
        budget = (images_lib.MIN_PIXELS, images_lib.MAX_PIXELS)
        proc = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(proc):
            with open(proc) as f:
                pp = json.load(f)
            budget = (int(pp.get("min_pixels", budget[0])), int(pp.get("max_pixels", budget[1])))
        return model.cfg, model.params, sidefiles.find_tokenizer_dir(path), budget
    from ovjax import checkpoint
    run_cfg, _ = run_config(path, None)
    params = checkpoint.load_params(path)
    data = run_cfg.get("data") or {}
    tok = sidefiles.find_tokenizer_dir(data.get("tokenizer"), *_run_tokenizers(path))
    return run_cfg.model, params, tok, pixel_budget(run_cfg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ovjax generate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF directory or a run's workdir")
    ap.add_argument("--prompt", required=True, action="append", help="repeat for a batch of prompts")
    ap.add_argument("--image", action="append", default=[], help="image file(s), used by the first prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from PIL import Image
    from transformers import PreTrainedTokenizerFast

    from ovjax.data import chat, images as images_lib

    cfg, params, tok_dir, (lo, hi) = load_for_generation(args.model)
    if tok_dir is None:
        print(f"generate: no tokenizer.json found for {args.model}", file=sys.stderr)
        return 1
    # The tokenizer file alone: AutoTokenizer would consult config.json's auto_map (remote code).
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tok_dir, "tokenizer.json"))
    template = chat.ChatTemplate(tok)
    pixels, grids = [], []
    for path in args.image:
        if not os.path.isfile(path):
            print(f"generate: no image file {path}", file=sys.stderr)
            return 1
        rows, grid = images_lib.preprocess(Image.open(path), min_pixels=lo, max_pixels=hi)
        pixels.append(rows)
        grids.append(grid)
    prompts = []
    for j, text in enumerate(args.prompt):
        n = len(grids) if j == 0 else 0
        content = "<image>\n" * n + text if "<image>" not in text else text
        ids, _ = template.encode([{"role": "user", "content": content}], grids if j == 0 else [],
                                 add_generation_prompt=True)
        prompts.append(ids)
    imgs = (np.concatenate(pixels), np.asarray(grids)) if pixels else None
    gen = Generator(cfg, params)
    outs = gen.generate(prompts, imgs, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed, pad_id=template.ids["endoftext"],
                        stop_ids=(template.ids["im_end"], template.ids["endoftext"]))
    for out in outs:
        print(tok.decode([t for t in out if t not in (template.ids["im_end"], template.ids["endoftext"])]))
    return 0
