"""Held-out evaluation by answer scoring: for each question, the candidate answer with the highest
log-likelihood under the model wins (greedy over a closed label set; robust for a small model, no decoding
loop). The control runs the same scoring with every image feature replaced by zeros, so any accuracy above
chance that survives it does not come from the image.

An item is {"type", "question", "answer", "image" (PIL) | "scene" (ovjax.data.synthetic.Scene)} with the
candidates of its type given by `candidates[type]`. Each (item, candidate) is one row:
    chat prompt (system "", user "<image>\\n{question}", "<|im_start|>assistant\\n") + answer + <|im_end|>
and its score is the sum of log p over the answer tokens and the closing <|im_end|> (the tokens training
supervised).

    python -m ovjax eval --checkpoint DEMO_DIR/stage2 --tokenizer DEMO_DIR/data/tokenizer [--config configs/demo.py:stage2]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from typing import Any, Callable

import numpy as np


class Scorer:
    """Scores rows with one jitted forward of fixed shape [batch, seq_len] / [batch, max_patches]."""

    def __init__(self, model_cfg, params, *, batch: int, seq_len: int, max_patches: int, mesh=None):
        import jax
        import jax.numpy as jnp

        from ovjax.models import vlm

        self.cfg = vlm.freeze(model_cfg)
        self.params = params
        self.batch, self.seq_len, self.max_patches = batch, seq_len, max_patches
        model = vlm.VLM(self.cfg)
        self.mesh = mesh

        def run(p, b, zero_images):
            """-> log p(targets) [B, T] (float32)."""
            hidden, _ = model.apply({"params": p}, b["tokens"], b["positions"], b["segment_ids"], b["patches"],
                                    b["patch_segment"], b["patch_hw"], num_images=1, zero_images=zero_images)
            logits = model.apply({"params": p}, hidden, method=vlm.VLM.logits)
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            return jnp.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]
        self._run = jax.jit(run, static_argnums=(2,))

    def logprobs(self, rows: dict[str, np.ndarray], zero_images: bool) -> np.ndarray:
        """rows: batch arrays with a leading dim of any size N -> log p(targets) [N, T] (numpy)."""
        import jax

        from ovjax import sharding

        n = rows["tokens"].shape[0]
        out = []
        for start in range(0, n, self.batch):
            chunk = {k: v[start:start + self.batch] for k, v in rows.items()}
            m = chunk["tokens"].shape[0]
            if m < self.batch:  # pad with empty rows: static shapes
                chunk = {k: np.concatenate([v, np.zeros((self.batch - m,) + v.shape[1:], v.dtype)])
                         for k, v in chunk.items()}
            if self.mesh is not None:
                with self.mesh, sharding.activation_rules(self.mesh):
                    shards = sharding.batch_shardings(chunk, self.mesh)
                    chunk = {k: jax.device_put(v, shards[k]) for k, v in chunk.items()}
                    lp = self._run(self.params, chunk, zero_images)
            else:
                lp = self._run(self.params, chunk, zero_images)
            out.append(np.asarray(lp)[:m])
        return np.concatenate(out) if out else np.zeros((0, self.seq_len), np.float32)


def build_rows(items: list[dict], candidates: dict[str, tuple[str, ...]], template, *, seq_len: int,
               max_patches: int, image_fn: Callable[[dict], Any], image_kw: dict | None = None) -> tuple[dict, list]:
    """Rows of every (item, candidate) -> (batch arrays [N, ...], [(item index, candidate index)]).

    The `targets`/`loss_mask` of a row mark the candidate's tokens and its <|im_end|>."""
    from ovjax.data import batch as batch_lib
    from ovjax.data import images

    ids = template.ids
    tok = template.tokenizer
    answer_ids = {a: list(tok.encode(a, add_special_tokens=False)) + [ids["im_end"]]
                  for cands in candidates.values() for a in cands}
    rows, index = [], []
    for i, it in enumerate(items):
        patches, grid = images.preprocess(image_fn(it), **(image_kw or {}))
        if len(patches) > max_patches:
            raise ValueError(f"item {i}: {len(patches)} patches > max_patches {max_patches}")
        conv = [{"role": "user", "content": "<image>\n" + it["question"]}]
        prompt, _ = template.encode(conv, [grid], add_generation_prompt=True)
        for c, a in enumerate(candidates[it["type"]]):
            seq = list(prompt) + answer_ids[a]
            if len(seq) > seq_len:
                raise ValueError(f"item {i}: {len(seq)} tokens > seq_len {seq_len}")
            writer = batch_lib.RowWriter(seq_len, max_patches)
            writer.add_sample(seq, np.arange(len(seq)) >= len(prompt))  # the answer and its <|im_end|>
            writer.add_image(patches, grid)
            rows.append(writer.row())
            index.append((i, c))
    if not rows:
        empty = batch_lib.shapes(0, seq_len, max_patches)
        return {k: np.zeros(shape, dtype) for k, (shape, dtype) in empty.items()}, index
    return batch_lib.stack_rows(rows), index


def score(scorer: Scorer, items: list[dict], candidates: dict[str, tuple[str, ...]], template, *,
          image_fn: Callable[[dict], Any], image_kw: dict | None = None, zero_images: bool = False) -> dict:
    """Accuracy of candidate scoring -> {"accuracy", "accuracy_by_type", "chance_by_type", "n_by_type",
    "predictions": [predicted answer per item]}."""
    rows, index = build_rows(items, candidates, template, seq_len=scorer.seq_len, max_patches=scorer.max_patches,
                             image_fn=image_fn, image_kw=image_kw)
    lp = scorer.logprobs(rows, zero_images)
    scores = (lp * rows["loss_mask"]).sum(axis=1)
    best: dict[int, tuple[float, int]] = {}
    for (i, c), s in zip(index, scores):
        if i not in best or s > best[i][0]:
            best[i] = (float(s), c)
    preds = [candidates[it["type"]][best[i][1]] for i, it in enumerate(items)]
    hits, counts = collections.Counter(), collections.Counter()
    for it, p in zip(items, preds):
        counts[it["type"]] += 1
        hits[it["type"]] += int(p == it["answer"])
    by_type = {t: hits[t] / counts[t] for t in counts}
    return {"accuracy": sum(hits.values()) / max(1, len(items)), "accuracy_by_type": by_type,
            "chance_by_type": {t: 1.0 / len(candidates[t]) for t in counts}, "n_by_type": dict(counts),
            "predictions": preds}


def synthetic_eval(model_cfg, params, tokenizer_dir, *, n_per_answer: int, seed: int, seq_len: int,
                   max_patches: int, batch: int = 32, mesh=None, types=None, max_pixels: int | None = None) -> dict:
    """Both evaluations (images, and the zero-feature control) on held-out synthetic questions."""
    from transformers import AutoTokenizer

    from ovjax.data import chat, synthetic

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    template = chat.ChatTemplate(tok, default_system="")
    items = synthetic.eval_items(n_per_answer, seed, types or synthetic.QUESTION_TYPES)
    cands = {t: synthetic.answers(t) for t in synthetic.QUESTION_TYPES}
    scorer = Scorer(model_cfg, params, batch=batch, seq_len=seq_len, max_patches=max_patches, mesh=mesh)
    kw = dict(image_fn=lambda it: synthetic.render(it["scene"]), image_kw={"max_pixels": max_pixels or synthetic.MAX_PIXELS})
    real = score(scorer, items, cands, template, **kw)
    control = score(scorer, items, cands, template, zero_images=True, **kw)
    return {"accuracy": real["accuracy"], "accuracy_by_type": real["accuracy_by_type"],
            "control_accuracy": control["accuracy"], "control_accuracy_by_type": control["accuracy_by_type"],
            "chance_by_type": real["chance_by_type"], "n_by_type": real["n_by_type"],
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ovjax eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a train workdir (its latest checkpoint is used)")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer directory of the synthetic dataset")
    parser.add_argument("--config", default="configs/demo.py:stage2", help="run config FILE.py:ARG")
    parser.add_argument("--n-per-answer", type=int, default=10)
    parser.add_argument("--seed", type=int, default=12345)
    args, overrides = parser.parse_known_args(argv)
    from ovjax import checkpoint, config
    from ovjax.train import dataset

    try:
        cfg = config.load(args.config, overrides)
        cfg = config.with_values(cfg, dataset.tokenizer_values(args.tokenizer))
    except config.ConfigError as e:
        print(f"eval: config error: {e}", file=sys.stderr)
        return 2
    if "answers" not in cfg:
        print(f"eval: {args.config} has no `answers` section (configs/demo.py has one)", file=sys.stderr)
        return 2
    params = checkpoint.load_params(args.checkpoint)
    out = synthetic_eval(cfg.model, params, args.tokenizer, n_per_answer=args.n_per_answer, seed=args.seed,
                         seq_len=int(cfg.answers.seq_len), max_patches=int(cfg.answers.max_patches),
                         batch=int(cfg.answers.batch), max_pixels=int(cfg.data.max_pixels) or None)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
