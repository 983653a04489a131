"""Command-line verbs. Each verb lives in its own module and is imported only when called, so that
`python -m ovjax --help` stays fast and a verb's heavy dependencies load only for that verb."""

from __future__ import annotations

import importlib
import sys

# verb -> (module with a `main(argv) -> int`, one-line description)
VERBS = {
    "synth": ("ovjax.data.synthetic", "make the synthetic shapes dataset (tokenizer, convert, pack): --out DIR"),
    "convert": ("ovjax.data.convert", "validate raw data (LLaVA JSON, parquet, webdataset) into raw ArrayRecord shards"),
    "balance": ("ovjax.data.balance", "concept-balanced resampling of raw shards (CLIP top-K concepts) -> selection manifest"),
    "mix": ("ovjax.data.mix", "weighted mixture of raw datasets -> a selection manifest for pack: --source DIR:W"),
    "pack": ("ovjax.data.pack", "pack raw shards offline into fixed-size bins (or plan from a lengths file)"),
    "train": ("ovjax.train.command", "train a stage: --config configs/stage1.py:tiny --workdir DIR"),
    "eval": ("ovjax.eval", "held-out answer-scoring evaluation of a demo checkpoint (and its zero-image control)"),
    "demo": ("ovjax.demo", "the embedded end-to-end demo on CPU"),
    "export": ("ovjax.hf.export_cmd", "a run's checkpoint -> a Hugging Face directory (transformers, lmms-eval)"),
    "import": ("ovjax.hf.import_cmd", "a Hugging Face directory -> a workdir that train starts a stage from"),
    "generate": ("ovjax.generate", "chat with a checkpoint (HF dir or workdir): KV cache, greedy or top-p sampling"),
    "assemble": ("ovjax.hf.assemble_cmd", "stage 0: RICE-ViT (mlcd layout) + Qwen3 + fresh projector -> HF dir"),
}


def usage() -> str:
    lines = ["usage: python -m ovjax <verb> [args...]", "", "verbs:"]
    lines += [f"  {verb:<9} {desc}" for verb, (_, desc) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = VERBS[verb][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            print(f"verb {verb!r} is not available in this build ({module_name} is missing)", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)
