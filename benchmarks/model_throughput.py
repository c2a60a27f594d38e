"""Model throughput: ours vs transformers' LlamaForCausalLM of the same shape, side by side in one run.

Measures, on whatever device is present (CPU here):
  * training: forward + backward tokens/s in fp32 and, where the hardware has native bf16 (CUDA, or
    CPUs with AVX512-BF16/AMX), under bf16 autocast (Baichuan 2's training precision); optionally
    both models under torch.compile (--compile);
  * decoding: greedy tokens/s with a KV cache, batch 1 (our `generate` vs HF `generate`).

Both models share one shape (default: the `ladder-20m` preset with a 4,096-token vocabulary, ~22.6M
parameters). Each measurement is the median of several timed repeats after warm-up; ours and theirs
alternate so background load hits both alike.

    python benchmarks/model_throughput.py [--preset ladder-20m] [--vocab 4096] [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from baichuan2.model import Baichuan, ModelConfig
from baichuan2.model.generate import SamplingConfig, generate


def hf_llama(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                         num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
                         max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                         tie_word_embeddings=False, rope_theta=cfg.rope_theta)
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


def _cpu_has_bf16() -> bool:
    try:
        return "avx512_bf16" in open("/proc/cpuinfo").read() or "amx_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="ladder-20m")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig.from_name(args.preset, vocab_size=args.vocab, max_position_embeddings=max(2048, args.seq))
    torch.manual_seed(0)
    ours = Baichuan(cfg).to(device)
    theirs = hf_llama(cfg).to(device)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"device={device.type} threads={torch.get_num_threads()} preset={args.preset} vocab={cfg.vocab_size} "
          f"params={n_params / 1e6:.1f}M (HF {sum(p.numel() for p in theirs.parameters()) / 1e6:.1f}M)")

    ids = torch.randint(3, cfg.vocab_size, (args.batch, args.seq), device=device)
    targets = ids.roll(-1, 1)
    tokens = args.batch * args.seq
    ours.train(), theirs.train()

    def train_rate(model_ours, model_theirs, precision: str) -> tuple[float, float]:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

        def step_ours():
            with autocast:
                loss = model_ours(ids, targets, return_logits=False).loss
            loss.backward()
            ours.zero_grad(set_to_none=True)

        def step_theirs():
            with autocast:
                loss = model_theirs(input_ids=ids, labels=ids).loss
            loss.backward()
            theirs.zero_grad(set_to_none=True)

        for _ in range(2):
            step_ours(), step_theirs()
        t_ours, t_theirs = [], []
        for _ in range(args.repeats):  # alternate so background load hits both alike
            t_ours.append(timed(step_ours, 1))
            t_theirs.append(timed(step_theirs, 1))
        return tokens / statistics.median(t_ours), tokens / statistics.median(t_theirs)

    rows = []
    precisions = ["fp32", "bf16"] if device.type == "cuda" or _cpu_has_bf16() else ["fp32"]
    for precision in precisions:
        rows.append((f"train fwd+bwd tok/s {precision} eager", *train_rate(ours, theirs, precision)))
    if args.compile:
        compiled_ours, compiled_theirs = torch.compile(ours), torch.compile(theirs)
        for precision in precisions:
            rows.append((f"train fwd+bwd tok/s {precision} compiled", *train_rate(compiled_ours, compiled_theirs,
                                                                                   precision)))

    ours.eval(), theirs.eval()
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt), device=device)
    greedy = SamplingConfig(max_new_tokens=args.new_tokens, do_sample=False, stop_token_ids=[])

    def decode_ours():
        out = generate(ours, prompt.tolist(), greedy)
        assert len(out[0]) == args.new_tokens

    def decode_theirs():
        with torch.inference_mode():
            out = theirs.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)
        assert out.shape[1] == args.prompt + args.new_tokens

    decode_ours(), decode_theirs()
    d_ours, d_theirs = [], []
    for _ in range(max(3, args.repeats // 2)):
        d_ours.append(timed(decode_ours, 1))
        d_theirs.append(timed(decode_theirs, 1))
    dec_ours, dec_theirs = args.new_tokens / statistics.median(d_ours), args.new_tokens / statistics.median(d_theirs)

    rows.append((f"greedy decode tok/s fp32 (b1, +{args.new_tokens})", dec_ours, dec_theirs))
    print(f"shape: batch {args.batch} x seq {args.seq} for training; prompt {args.prompt} for decoding")
    print(f"{'measure':<42}{'ours':>10}{'HF Llama':>10}{'ratio':>9}")
    for name, a, b in rows:
        print(f"{name:<42}{a:>10.1f}{b:>10.1f}{a / b:>8.2f}x")

if __name__ == "__main__":
    main()
