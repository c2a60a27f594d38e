"""Alignment throughput and memory, ours vs TRL, side by side in one run (a benchmark, not a test).

1. SFT: tokens/s, steps/s and peak memory of our engine (``align.sft.SFTObjective`` on ``train.engine.fit``)
   vs TRL's ``SFTTrainer``, on the same model weights and the same conversations in the same order, with
   the per-step losses of both printed side by side (equal loss check) and MFU against the measured matmul
   peak (``train.mfu``).
2. DPO: the same for our ``DPOObjective`` vs TRL's ``DPOTrainer`` (sigmoid loss, beta 0.1, reference
   log-probs precomputed on both sides; the precompute is counted in the time).
3. (not in --quick) Peak memory of the log-probabilities DPO/PPO need at Baichuan 2's 125,696-token
   vocabulary, one 7B-shape head (hidden 4,096), 2 x 1,024 positions: full ``[b, s, V]`` fp32
   log-softmax vs ``align.logprobs.token_logprobs`` (chunked, recomputed in backward).

The model: a transformers ``LlamaForCausalLM`` with the ``ladder-20m`` shape (seeded random weights, no
z-loss, plain head), converted to our layout with ``baichuan2 convert from-llama`` (logits checked against
transformers); TRL trains the Llama, we train the conversion.  The data: the LLaMA-Factory demo sets in
../shared/data/align (Alpaca SFT, DPO pairs) in Baichuan 2's chat format, tokenised once by our tokenizer
and handed to both sides pre-tokenised (assistant-only loss; for DPO only the final answer).  By default
the vocabulary is compacted to the token ids the data uses (the model stays ~20M-parameter and the run
short); ``--full-vocab`` keeps all 125,696.  Both sides: AdamW (0.9, 0.95), constant LR, no weight decay,
clip 1.0, the same batch size, right padding to the longest row, batches in data order.  Each run is its own
process (peak RSS is per run); times are wall-clock from the trainer's construction to the end of training,
so compile time and dataset preparation are counted ("total"), and also per step after the first two
("steady").

    python benchmarks/align_throughput.py --quick      # ~3 minutes on an idle 2-core machine
    python benchmarks/align_throughput.py              # more steps, + TRL under torch.compile, + fp32, + memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


# ------------------------------------------------------------------------------------------------
# Data and model (parent process)
# ------------------------------------------------------------------------------------------------

def prepare(workdir: Path, args) -> dict:
    """Tokenised SFT rows and DPO pairs, the Llama source model and its verified conversion."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from baichuan2.align.dpo import encode_dpo_pairs
    from baichuan2.align.preference import read_pairs
    from baichuan2.align.sft import read_conversations
    from baichuan2.model import ModelConfig
    from baichuan2.model.convert import from_llama
    from baichuan2.tokenizer import Tokenizer
    from baichuan2.tokenizer.chat import encode_chat

    data = SHARED / "align" / "llama-factory-demo" / "data"
    tok = Tokenizer.from_pretrained(SHARED / "baichuan2-tokenizer")
    seq = args.seq
    sft_rows = []
    for msgs in read_conversations([str(data / "alpaca_en_demo.json")]):
        ids, tgt = encode_chat(tok, msgs, seq)
        tgt = tgt[:-1] + [-100]  # the last target would be a token past the row (truncation): scored by neither
        if any(t != -100 for t in tgt):
            sft_rows.append((ids, tgt))
        if len(sft_rows) == args.batch * args.steps:
            break
    pairs = []
    for p in encode_dpo_pairs(tok, list(read_pairs([str(data / "dpo_en_demo.json")])), seq):
        pc, pr = _prompt_len(p.chosen[1]), _prompt_len(p.rejected[1])
        if pc == pr and p.chosen[0][:pc] == p.rejected[0][:pr] and _trl_scores_same(p.chosen) \
                and _trl_scores_same(p.rejected):
            pairs.append(p)
        if len(pairs) == args.dpo_batch * args.dpo_steps:
            break
    vocab = tok.vocab_size
    if not args.full_vocab:  # ids the data uses -> 0..K-1 (pad and specials first)
        used = sorted({0, 1, 2, tok.eos_id, tok.user_id, tok.assistant_id}
                      | {t for r in sft_rows for t in r[0]}
                      | {t for p in pairs for r in (p.chosen, p.rejected) for t in r[0]})
        remap = {t: k for k, t in enumerate(used)}
        vocab = (len(used) + 63) // 64 * 64

        def m(row):
            return [remap[t] for t in row[0]], [remap[t] if t != -100 else -100 for t in row[1]]

        sft_rows = [m(r) for r in sft_rows]
        pairs = [type(p)(m(p.chosen), m(p.rejected)) for p in pairs]
    shape = ModelConfig.from_name(args.preset)
    hf_cfg = LlamaConfig(vocab_size=vocab, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                         num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
                         max_position_embeddings=max(2048, seq), rms_norm_eps=shape.rms_norm_eps,
                         tie_word_embeddings=False, rope_theta=shape.rope_theta, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(hf_cfg)
    llama.save_pretrained(workdir / "llama")
    from_llama(str(workdir / "llama"), str(workdir / "ours"))
    return {"sft": sft_rows, "pairs": [(p.chosen, p.rejected) for p in pairs], "vocab": vocab,
            "params": sum(p.numel() for p in llama.parameters())}


def _prompt_len(targets: list[int]) -> int:
    """Tokens before the first scored one (our targets are aligned: ``targets[i]`` is scored after ``ids[i]``)."""
    return next(i for i, t in enumerate(targets) if t != -100) + 1


def _trl_scores_same(row) -> bool:
    """TRL scores every completion token to the end of the row: ours must too (no trailing unscored tokens)."""
    ids, tgt = row
    p = _prompt_len(tgt)
    return all(t != -100 for t in tgt[p - 1:-1]) and tgt[-1] == -100 and len(ids) > p


def _hf_labels(ids: list[int], tgt: list[int]) -> list[int]:
    return [-100] + [ids[j] if tgt[j - 1] != -100 else -100 for j in range(1, len(ids))]


# ------------------------------------------------------------------------------------------------
# One run (child process)
# ------------------------------------------------------------------------------------------------

def _ours(kind: str, workdir: Path, data: dict, cfg: dict) -> dict:
    from baichuan2.align.dpo import DPOArgs, DPOObjective, DPOPair, reference_logprobs
    from baichuan2.align.sft import SFTArgs, SFTObjective
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.train.engine import CheckpointArgs, FitArgs, autocast_for, fit
    from baichuan2.train.optim import OptimArgs

    model = load_pretrained(workdir / "ours", dtype="float32", z_loss_weight=0.0)
    optim = OptimArgs(lr=cfg["lr"], min_lr_ratio=1.0, beta2=0.95, weight_decay=0.0, grad_clip=1.0, warmup_steps=0)
    fit_args = FitArgs(precision=cfg["precision"], compile=cfg["compile"], micro_batch_size=0, device="cpu")
    run = Path(tempfile.mkdtemp(dir=workdir))
    base = _rss_mb()
    t0 = time.perf_counter()
    if kind == "sft":
        obj = SFTObjective(data["sft"], [], 0, SFTArgs(max_length=cfg["seq"], batch_size=cfg["batch"]))
    else:
        pairs = [DPOPair(c, r) for c, r in data["pairs"]]
        # in the training batches, as TRL does (so under bf16 step 1's loss is exactly log 2 on both sides)
        ref = reference_logprobs(model, pairs, 0, torch.device("cpu"), cfg["batch"],
                                 autocast_for(cfg["precision"], torch.device("cpu")))
        obj = DPOObjective(pairs, [], 0, DPOArgs(max_length=cfg["seq"], batch_size=cfg["batch"]), ref, None)
    b = cfg["batch"]
    obj.batches = [list(range(k, min(k + b, len(obj.items)))) for k in range(0, len(obj.items), b)]  # data order
    res = fit(model, obj, run, optim, fit_args, CheckpointArgs(keep_last=0, release_final=False), progress=False)
    total = time.perf_counter() - t0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step_times = [x["step_time"] for x in lines if "step_time" in x]
    return {"losses": res.losses, "total_s": total, "steady_step_s": statistics.mean(step_times[2:] or step_times),
            "peak_mb": _peak_rss_mb(), "train_mb": _peak_rss_mb() - base}


def _trl_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    # TRL wants a processing class for its pad/eos ids only: the data arrives tokenised
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                   pad_token="<unk>", bos_token="<s>", eos_token="</s>")


def _trl(kind: str, workdir: Path, data: dict, cfg: dict) -> dict:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, TrainerCallback

    model = AutoModelForCausalLM.from_pretrained(workdir / "llama", dtype=torch.float32)
    common = dict(output_dir=str(workdir / f"trl-{kind}"), per_device_train_batch_size=cfg["batch"],
                  max_steps=cfg["steps"], learning_rate=cfg["lr"], lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch_fused",
                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=cfg["precision"] == "bf16",
                  torch_compile=cfg["compile"], disable_tqdm=True, seed=0, dataloader_num_workers=0)
    step_ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            step_ends.append(time.perf_counter())

    base = _rss_mb()
    t0 = time.perf_counter()
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        class Trainer(SFTTrainer):
            def _get_train_sampler(self, *a, **k):  # data order, as ours
                return SequentialSampler(self.train_dataset)

        rows = [{"input_ids": ids, "labels": _hf_labels(ids, tgt)} for ids, tgt in data["sft"]]
        trainer = Trainer(model=model, args=SFTConfig(**common, max_length=None, packing=False),
                          train_dataset=Dataset.from_list(rows), processing_class=_trl_tokenizer(),
                          callbacks=[Clock()])
    else:
        from trl import DPOConfig, DPOTrainer

        class Trainer(DPOTrainer):
            def _get_train_sampler(self, *a, **k):
                return SequentialSampler(self.train_dataset)

            def _prepare_dataset(self, dataset, *a, **k):  # already tokenised (ours), nothing to prepare
                return dataset

        rows = []
        for (ci, ct), (ri, _) in data["pairs"]:
            p = _prompt_len(ct)
            rows.append({"prompt_ids": ci[:p], "chosen_ids": ci[p:], "rejected_ids": ri[p:]})
        trainer = Trainer(model=model, args=DPOConfig(**common, max_length=None, beta=0.1, loss_type=["sigmoid"],
                                                      precompute_ref_log_probs=True),
                          train_dataset=Dataset.from_list(rows), processing_class=_trl_tokenizer(),
                          callbacks=[Clock()])
    trainer.train()
    total = time.perf_counter() - t0
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    gaps = [b - a for a, b in zip(step_ends, step_ends[1:])]
    return {"losses": losses, "total_s": total, "steady_step_s": statistics.mean(gaps[1:] or gaps),
            "peak_mb": _peak_rss_mb(), "train_mb": _peak_rss_mb() - base}


def _child(side: str, kind: str, workdir: str, cfg: dict, queue) -> None:
    torch.manual_seed(0)
    data = json.loads((Path(workdir) / "data.json").read_text())
    try:
        queue.put((_ours if side == "ours" else _trl)(kind, Path(workdir), data, cfg))
    except Exception as e:  # the parent prints it and goes on with the other runs
        import traceback

        traceback.print_exc()
        queue.put({"error": f"{type(e).__name__}: {e}"})


def run_one(side: str, kind: str, workdir: Path, cfg: dict) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(side, kind, str(workdir), cfg, q))
    proc.start()
    out = q.get()
    proc.join()
    return out


# ------------------------------------------------------------------------------------------------
# Memory of the log-probs at 125,696 tokens (unchanged from before)
# ------------------------------------------------------------------------------------------------

def _peak_of(variant: str, vocab: int, hidden: int, batch: int, seq: int, queue) -> None:
    """In a fresh process: peak RSS growth (MB) of one forward + backward of the log-probs."""
    from baichuan2.align.logprobs import token_logprobs

    torch.manual_seed(0)
    weight = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    h = torch.randn(batch, seq, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (batch, seq))
    weight.grad = torch.zeros_like(weight)  # the gradient buffer exists either way: not counted
    h.grad = torch.zeros_like(h)
    base = _peak_rss_mb()
    if variant == "full":
        lp = torch.log_softmax((h @ weight.t()).float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    else:
        lp = token_logprobs(h, weight, targets)
    lp.sum().backward()
    queue.put(_peak_rss_mb() - base)


def memory_figure(vocab: int = 125_696, hidden: int = 4096, batch: int = 2, seq: int = 1024) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    peaks = {}
    for variant in ("full", "chunked"):
        q = ctx.Queue()
        proc = ctx.Process(target=_peak_of, args=(variant, vocab, hidden, batch, seq, q))
        proc.start()
        peaks[variant] = q.get()
        proc.join()
    a, b = peaks["full"], peaks["chunked"]
    print(f"log-probs, vocab {vocab:,}, 7B-shape head (hidden {hidden}), {batch}x{seq} positions, fwd+bwd: "
          f"peak memory above inputs and gradient buffers: full logits {a:,.0f} MB, chunked {b:,.0f} MB "
          f"({a / max(b, 1.0):.1f}x less); the [b, s, V] fp32 logits alone are {batch * seq * vocab * 4 / 2**20:,.0f} MB",
          flush=True)


# ------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few steps, bf16 only, TRL eager (~3 min idle)")
    ap.add_argument("--preset", default="ladder-20m", help="model shape (a ModelConfig preset)")
    ap.add_argument("--full-vocab", action="store_true", help="keep the tokenizer's 125,696 ids (else compacted)")
    ap.add_argument("--seq", type=int, default=256, help="longest row (tokens)")
    ap.add_argument("--steps", type=int, default=0, help="SFT steps (default 6 quick, 20 full)")
    ap.add_argument("--batch", type=int, default=8, help="SFT conversations per step")
    ap.add_argument("--dpo-steps", type=int, default=0, help="DPO steps (default 4 quick, 12 full)")
    ap.add_argument("--dpo-batch", type=int, default=4, help="DPO pairs per step")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--skip-memory", action="store_true")
    a = ap.parse_args()
    a.steps = a.steps or (6 if a.quick else 20)
    a.dpo_steps = a.dpo_steps or (4 if a.quick else 12)
    from baichuan2.model import ModelConfig
    from baichuan2.train.mfu import peak_flops

    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = prepare(workdir, a)
        (workdir / "data.json").write_text(json.dumps(data))
        cfg_model = ModelConfig.from_name(a.preset, vocab_size=data["vocab"])
        n_sft_tokens = sum(len(r[0]) for r in data["sft"])
        n_dpo_tokens = sum(len(r[0]) for p in data["pairs"] for r in p)
        print(f"model {a.preset} shape, vocab {data['vocab']:,}, {data['params'] / 1e6:.1f}M parameters; SFT "
              f"{len(data['sft'])} conversations ({n_sft_tokens:,} tokens) in {a.steps} steps of {a.batch}; DPO "
              f"{len(data['pairs'])} pairs ({n_dpo_tokens:,} tokens) in {a.dpo_steps} steps of {a.dpo_batch}",
              flush=True)
        # (ours: precision, compile) vs (TRL: precision, compile)
        setups = [("bf16", True, "bf16", False)]
        if not a.quick:
            setups += [("bf16", True, "bf16", True), ("bf16", False, "bf16", False), ("fp32", False, "fp32", False)]
        rows = []
        for kind, steps, batch, tokens in (("sft", a.steps, a.batch, n_sft_tokens),
                                           ("dpo", a.dpo_steps, a.dpo_batch, n_dpo_tokens)):
            for p_ours, c_ours, p_trl, c_trl in setups:
                res = {}
                for side, prec, comp in (("ours", p_ours, c_ours), ("trl", p_trl, c_trl)):
                    cfg = {"precision": prec, "compile": comp, "batch": batch, "steps": steps, "seq": a.seq,
                           "lr": a.lr if kind == "sft" else a.lr / 10}
                    res[side] = run_one(side, kind, workdir, cfg)
                    r = res[side]
                    if "error" in r:
                        print(f"{kind} {side}: FAILED {r['error']}", flush=True)
                        continue
                    peak, _ = peak_flops(torch.device("cpu"), prec)
                    r["tok_s"] = tokens / r["total_s"]
                    r["steady_tok_s"] = tokens / steps / r["steady_step_s"]
                    r["mfu"] = cfg_model.flops_per_token(a.seq) * r["steady_tok_s"] / peak
                    label = f"{prec}{' + compile' if comp else ''}"
                    print(f"{kind} {side:4s} {label:15s} total {r['total_s']:6.1f} s  {r['tok_s']:8,.0f} tok/s  "
                          f"{steps / r['total_s']:5.2f} steps/s | steady {r['steady_tok_s']:8,.0f} tok/s "
                          f"{1 / r['steady_step_s']:5.2f} steps/s  MFU {r['mfu']:5.1%} | peak RSS "
                          f"{r['peak_mb']:,.0f} MB (+{r['train_mb']:,.0f} MB training)", flush=True)
                if "error" in res["ours"] or "error" in res["trl"]:
                    continue
                lo, lt = res["ours"]["losses"], res["trl"]["losses"]
                diff = max(abs(x - y) for x, y in zip(lo, lt, strict=False)) if lo and lt else float("nan")
                print(f"  losses ours {[round(x, 4) for x in lo]}\n  losses TRL  {[round(x, 4) for x in lt]}\n"
                      f"  max |loss difference| {diff:.2e}", flush=True)
                o, t = res["ours"], res["trl"]
                rows.append((f"{kind} ours {p_ours}{'+compile' if c_ours else ''} vs TRL {p_trl}"
                             f"{'+compile' if c_trl else ''}", t["total_s"] / o["total_s"],
                             t["steady_step_s"] / o["steady_step_s"], t["train_mb"] / max(o["train_mb"], 1.0), diff))
        print(f"\n{'ratio ours / TRL (higher = ours better)':<52}{'total':>8}{'steady':>8}{'memory':>8}{'loss diff':>11}")
        for name, tot, st, mem, diff in rows:
            print(f"{name:<52}{tot:>7.2f}x{st:>7.2f}x{mem:>7.2f}x{diff:>11.1e}")
    if not (a.quick or a.skip_memory):
        memory_figure()
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
