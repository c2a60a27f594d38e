"""`baichuan2 <verb> ...`: one command line over plain typed functions.

Each verb lives in the subpackage it belongs to, as a module that exposes
``COMMANDS``: either one function (``baichuan2 pretrain --config x.yaml``) or a
dict of functions for sub-verbs (``baichuan2 tokenizer train ...``).  The
arguments, their types and their ``--help`` text come from the function
signature and docstring through jsonargparse, so every verb also accepts
``--config recipe.yaml`` and dotted overrides (``--optim.lr 3e-4``).

Modules are imported only for the verb that runs, so ``baichuan2 --help`` is
instant and a missing optional extra (Ray, FastAPI) only matters to its verb.
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module exposing COMMANDS, one-line summary)
VERBS: dict[str, tuple[str, str]] = {
    "data": ("baichuan2.data.cli", "clean, deduplicate, cluster and score a corpus (local or Ray)"),
    "tokenizer": ("baichuan2.tokenizer.cli", "train a SentencePiece BPE, encode corpora to token shards, compression stats"),
    "pretrain": ("baichuan2.train.cli", "pretrain a model from token shards (torchrun for multi-GPU/multi-node)"),
    "plot": ("baichuan2.train.plot", "draw loss / LR / throughput curves from run logs to PNG"),
    "scaling": ("baichuan2.pipeline.scaling_cli", "plan and run a model ladder, fit L(C) = a*C^b + L_inf, predict"),
    "sft": ("baichuan2.align.sft_cli", "supervised fine-tuning on chat data, assistant-only loss (full or LoRA)"),
    "rm": ("baichuan2.align.rm_cli", "train / evaluate a reward model (pairwise loss, per-category accuracy)"),
    "dpo": ("baichuan2.align.dpo_cli", "direct preference optimisation on preference pairs (sigmoid / IPO, cached reference)"),
    "ppo": ("baichuan2.align.ppo_cli", "PPO against a reward model with Baichuan 2's settings"),
    "eval": ("baichuan2.eval.cli", "benchmarks (C-Eval/CMMLU/MMLU/Gaokao/AGIEval, BBH, GSM8K, MATH, HumanEval, MBPP), perplexity, checkpoints"),
    "chat": ("baichuan2.serve.chat", "interactive streaming chat in the terminal"),
    "serve": ("baichuan2.serve.server", "OpenAI-compatible HTTP server"),
    "generate": ("baichuan2.model.generate", "complete a prompt with a checkpoint"),
    "convert": ("baichuan2.model.convert", "convert checkpoints (Baichuan <-> Llama, .bin -> safetensors)"),
    "quantize": ("baichuan2.model.quant", "weight-only int8/int4 quantized checkpoint (CPU int-weight kernels)"),
    "export": ("baichuan2.export.gguf", "export a checkpoint as GGUF (f16/q8_0/q4_0) for llama.cpp / Ollama"),
    "pipeline": ("baichuan2.pipeline.run", "the whole Baichuan 2 recipe end to end on a bundled corpus"),
}


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = [
        "usage: baichuan2 <verb> [options]    (baichuan2 <verb> --help for a verb's options)",
        "",
        "Baichuan 2, end to end: data -> tokenizer -> pretrain -> scaling -> chat/serve.",
        "",
        "verbs:",
    ]
    lines += [f"  {verb.ljust(width)}  {summary}" for verb, (_, summary) in VERBS.items()]
    return "\n".join(lines)


def recipe_parser(verb: str, sub: str | None = None):
    """The jsonargparse parser of a verb (or sub-verb), e.g. to validate a YAML recipe without running it."""
    from jsonargparse import auto_parser

    commands = importlib.import_module(VERBS[verb][0]).COMMANDS
    fn = commands[sub] if isinstance(commands, dict) else commands
    return auto_parser(fn, as_positional=True)


def configs_first(args: list[str], subcommands=()) -> list[str]:
    """Move ``--config FILE`` (and ``--config=FILE``) ahead of the other flags, after a sub-verb if any.

    jsonargparse applies a config file where it stands, so in ``--out_dir X --config recipe.yaml`` the
    recipe's out_dir would silently replace the user's X; with the recipes first, a flag on the command
    line always wins over a recipe, whatever the order they were typed in."""
    head = args[:1] if args[:1] and args[0] in subcommands else []
    configs, others, i = [], [], len(head)
    while i < len(args):
        if args[i] == "--config" and i + 1 < len(args):
            configs += args[i: i + 2]
            i += 2
            continue
        (configs if args[i].startswith("--config=") else others).append(args[i])
        i += 1
    return head + configs + others


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    if argv[0] in ("-V", "--version"):
        from baichuan2 import __version__

        print(__version__)
        return
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"baichuan2: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(VERBS[verb][0])
    from jsonargparse import auto_cli

    from baichuan2.utils.io import InputError

    try:
        subcommands = module.COMMANDS if isinstance(module.COMMANDS, dict) else ()
        auto_cli(module.COMMANDS, args=configs_first(rest, subcommands), prog=f"baichuan2 {verb}", as_positional=True,
                 allow_abbrev=False)  # a shortened or stale flag (--ladder.lr) must not silently set another field
    except InputError as e:  # bad data, config or checkpoint: one clear line, no traceback
        raise SystemExit(f"baichuan2 {verb}: error: {e}") from None


if __name__ == "__main__":
    main()
