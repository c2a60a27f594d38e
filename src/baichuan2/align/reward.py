"""Reward model: the LM trunk plus a scalar head, trained with InstructGPT's pairwise loss.

``score = head(h_last)`` where ``h_last`` is the final hidden state of the last real token (the EOS that
ends the assistant turn), and ``loss = -log sigmoid(r_chosen - r_rejected)``. Sequences are truncated from
the left, because chosen and rejected differ at their ends. The same module with per-token outputs is
PPO's critic (``values``).

Evaluation reports pairwise accuracy overall, per taxonomy category at each of the three levels, by the
annotated score gap when the data has one (Baichuan 2's Table 4: larger gaps are judged more accurately),
and by buckets of the model's own margin |r_c - r_r| (the same question asked of the model: are its
confident calls right more often?).

On disk a reward model is an HF-layout LM checkpoint (so the trunk loads anywhere) plus
``value_head.safetensors`` and ``reward_config.json`` (head settings, score mean/std for normalisation).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from baichuan2.align.preference import Pair
from baichuan2.align.sft import LoraArgs, apply_lora, plain_model
from baichuan2.align.taxonomy import DEFAULT_TAXONOMY, Taxonomy, category_levels
from baichuan2.eval.scoring import length_batches, right_pad
from baichuan2.tokenizer.chat import encode_chat
from baichuan2.train.engine import CheckpointArgs, EpochObjective, FitArgs
from baichuan2.train.optim import OptimArgs
from baichuan2.train.parallel import ParallelArgs
from baichuan2.utils.io import InputError, atomic_write_json, read_json

HEAD_FILE = "value_head.safetensors"
CONFIG_FILE = "reward_config.json"


class RewardModel(nn.Module):
    """``lm.model`` (trunk) + ``head`` (hidden -> 1). The LM's own head is kept only so the directory
    stays a loadable LM checkpoint; it gets no gradient."""

    def __init__(self, lm, score_mean: float = 0.0, score_std: float = 1.0):
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.config.hidden_size, 1, bias=False, device=lm.device, dtype=torch.float32)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(lm.config.hidden_size + 1))
        lm.lm_head.weight.requires_grad_(False)
        self.score_mean, self.score_std = score_mean, score_std

    @property
    def config(self):
        return self.lm.config

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[b, t]`` scalar output at every position (fp32): the critic's V(s_t)."""
        hidden = self.lm.model(input_ids, attention_mask=attention_mask)
        return self.head(hidden.float()).squeeze(-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[b]`` scores at each row's last real token (rows right-padded, mask 1 = token)."""
        last = attention_mask.long().sum(dim=1) - 1
        return self.values(input_ids, attention_mask)[torch.arange(input_ids.shape[0], device=input_ids.device), last]

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores on the training distribution's scale: mean 0, std 1 (for PPO rewards)."""
        return (scores - self.score_mean) / max(self.score_std, 1e-6)

    def save(self, directory: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        from baichuan2.model.checkpoint import save_pretrained

        meta = {"head": "linear_last_token", "score_mean": self.score_mean, "score_std": self.score_std,
                **(extra or {})}
        with tempfile.TemporaryDirectory() as tmp:
            head = Path(tmp) / HEAD_FILE
            save_file({"weight": self.head.weight.detach().float().cpu().contiguous()}, str(head))
            return save_pretrained(self.lm, directory, tokenizer=tokenizer, overwrite=True,
                                   extra_files={CONFIG_FILE: meta}, copy_files=[head])

    @classmethod
    def load(cls, directory: str | Path, dtype: str = "auto", device: str = "cpu") -> RewardModel:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from baichuan2.model.checkpoint import CheckpointError, load_pretrained
        from baichuan2.utils.checksums import ChecksumError, verify_manifest

        d = Path(directory)
        if not (d / HEAD_FILE).exists() or not (d / CONFIG_FILE).exists():
            raise CheckpointError(f"{d}: not a reward model (needs {HEAD_FILE} and {CONFIG_FILE}; train one with "
                                  "`baichuan2 rm train`)")
        meta = read_json(d / CONFIG_FILE)
        rm = cls(load_pretrained(d, dtype=dtype, device=device), meta.get("score_mean", 0.0),
                 meta.get("score_std", 1.0))
        try:
            verify_manifest(d, files=[HEAD_FILE])  # the body's weights were checked by load_pretrained
            weight = load_file(str(d / HEAD_FILE))["weight"]
        except (SafetensorError, KeyError, OSError, ChecksumError) as e:
            raise CheckpointError(f"{d / HEAD_FILE}: unreadable value head ({e})") from None
        if weight.shape != rm.head.weight.shape:
            raise CheckpointError(f"{d / HEAD_FILE}: head shape {tuple(weight.shape)} does not match hidden size "
                                  f"{rm.config.hidden_size}")
        with torch.no_grad():
            rm.head.weight.copy_(weight)
        return rm


def encode_for_reward(tok, messages: list[dict], max_length: int) -> list[int]:
    """Chat ids ending with the EOS after the last assistant turn, left-truncated to ``max_length``."""
    ids, _ = encode_chat(tok, messages)
    if ids[-1] != tok.eos_id:
        ids.append(tok.eos_id)
    return ids[-max_length:]


@torch.no_grad()
def score_rows(rm: RewardModel, rows: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
    """Raw scores of token rows (each ending with EOS), longest-first batches to limit padding."""
    was_training = rm.training
    rm.eval()
    out = torch.empty(len(rows))
    pad = rm.config.pad_token_id or 0
    for idx in length_batches([len(r) for r in rows], batch_size):
        ids, mask = right_pad([rows[i] for i in idx], pad)
        out[idx] = rm(ids.to(rm.device), mask.to(rm.device)).float().cpu()
    rm.train(was_training)
    return out


@dataclass
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    category: str
    gap: float | None


def encode_pairs(tok, pairs: Sequence[Pair], max_length: int, taxonomy: Taxonomy) -> list[EncodedPair]:
    out = []
    for p in pairs:
        c, r = encode_for_reward(tok, p.chosen, max_length), encode_for_reward(tok, p.rejected, max_length)
        if c == r:
            continue  # identical after truncation: no preference signal
        out.append(EncodedPair(c, r, taxonomy.resolve(p.category, p.prompt_text), p.gap))
    return out


@dataclass
class RMArgs:
    """Args:
        max_length: Tokens per sequence (left-truncated: chosen and rejected differ at the end).
        epochs: Passes over the training pairs.
        batch_size: Pairs per optimizer step, all ranks together (both answers go through one forward pass).
        margin: Subtracted from r_c - r_r inside the loss (0 = InstructGPT's loss).
        center_coef: Weight of mean((r_c + r_r)^2), keeping scores centred (0 = off).
        val_fraction: Share of pairs held out for evaluation (when no eval_data is given).
        seed: Split and shuffle seed.
        taxonomy: 3-level prompt taxonomy YAML (categories for unlabelled prompts and the report).
        lora: LoRA on the trunk (r = 0: full fine-tuning); the new scalar head is always trained in full.
    """

    max_length: int = 512
    epochs: int = 1
    batch_size: int = 16
    margin: float = 0.0
    center_coef: float = 0.0
    val_fraction: float = 0.1
    seed: int = 0
    taxonomy: str = str(DEFAULT_TAXONOMY)
    lora: LoraArgs = field(default_factory=LoraArgs)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0,
                  center_coef: float = 0.0) -> torch.Tensor:
    """InstructGPT: ``-log sigmoid(r_c - r_r - margin)``, optionally + ``center_coef * mean((r_c + r_r)^2)``."""
    loss = -nn.functional.logsigmoid(chosen - rejected - margin).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def evaluate_reward_model(rm: RewardModel, pairs: Sequence[EncodedPair], batch_size: int = 16,
                          margin_buckets: int = 5) -> dict:
    """Pairwise accuracy overall, per category level, per annotated gap and per model-margin bucket."""
    if not pairs:
        raise InputError("no evaluation pairs")
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    scores = score_rows(rm, rows, batch_size)
    rc, rr = scores[: len(pairs)], scores[len(pairs):]
    win = ((rc > rr).float() + 0.5 * (rc == rr).float()).tolist()  # a tie is a coin flip

    def table(keys: list[str]) -> dict:
        groups: dict[str, list[float]] = defaultdict(list)
        for k, w in zip(keys, win, strict=True):
            groups[k].append(w)
        return {k: {"n": len(v), "accuracy": round(100 * sum(v) / len(v), 2)} for k, v in sorted(groups.items())}

    levels = [category_levels(p.category) for p in pairs]
    report = {
        "n": len(pairs), "accuracy": round(100 * sum(win) / len(win), 2),
        "mean_margin": round(float((rc - rr).mean()), 4),
        "by_primary": table([lv[0] for lv in levels]),
        "by_secondary": table([lv[1] for lv in levels]),
        "by_category": table([lv[2] for lv in levels]),
    }
    if any(p.gap is not None for p in pairs):
        report["by_gap"] = table([str(p.gap) if p.gap is not None else "none" for p in pairs])
    margins = (rc - rr).abs()
    edges = torch.quantile(margins, torch.linspace(0, 1, margin_buckets + 1)).tolist()
    bucket = [min(margin_buckets - 1, sum(m > e for e in edges[1:-1])) for m in margins.tolist()]
    by_margin = table([f"q{b + 1}" for b in bucket])
    for b in range(margin_buckets):
        if f"q{b + 1}" in by_margin:
            by_margin[f"q{b + 1}"]["margin_range"] = [round(edges[b], 4), round(edges[b + 1], 4)]
    report["by_margin_quantile"] = by_margin
    return report


def rm_optim(**changes) -> OptimArgs:
    """The reward model's optimiser defaults: peak LR 1e-5, 3% warm-up, cosine to 10%, no decay, clip 1.0."""
    return dataclasses.replace(OptimArgs(lr=1e-5, warmup_steps=0, warmup_frac=0.03, weight_decay=0.0,
                                         grad_clip=1.0), **changes)


class RewardObjective(EpochObjective):
    """The pairwise loss over a batch of pairs (chosen and rejected in one forward pass), weighted by pairs."""

    name = "reward model"

    def __init__(self, train: Sequence[EncodedPair], pad: int, args: RMArgs):
        super().__init__(list(train), args.batch_size, args.epochs, args.seed)
        self.pad, self.args, self.seq_len = pad, args, args.max_length

    def make_micro(self, examples: list, real: bool) -> dict:
        ids, mask = right_pad([p.chosen for p in examples] + [p.rejected for p in examples], self.pad)
        return {"input_ids": ids, "attention_mask": mask, "count": len(examples) if real else 0}

    def loss(self, model, micro: dict):
        device = self.info.device
        scores = model(micro["input_ids"].to(device), micro["attention_mask"].to(device)).float()
        half = scores.shape[0] // 2
        rc, rr = scores[:half], scores[half:]
        loss = pairwise_loss(rc, rr, self.args.margin, self.args.center_coef)
        rc, rr = rc.detach(), rr.detach()
        return loss, {"loss": float(loss.detach()), "accuracy": float((rc > rr).float().mean()),
                      "margin": float((rc - rr).mean())}


def train_reward_model(rm: RewardModel, tok, train: Sequence[EncodedPair], val: Sequence[EncodedPair],
                       out_dir: str | Path, args: RMArgs = RMArgs(), progress: bool = True,
                       optim: OptimArgs | None = None, fit_args: FitArgs | None = None,
                       checkpoint: CheckpointArgs | None = None, parallel: ParallelArgs | None = None,
                       resume: bool | str = False) -> dict:
    """Train ``rm`` in place with the pairwise loss on the engine; evaluate before/after; save to ``out_dir``."""
    from baichuan2.model.model import Baichuan
    from baichuan2.train.engine import fit
    from baichuan2.train.parallel import init_distributed

    if not train:
        raise InputError("no training pairs")
    optim, fit_args, parallel = optim or rm_optim(), fit_args or FitArgs(precision="fp32"), parallel or ParallelArgs()
    info = init_distributed(parallel.tp, fit_args.device)
    out = Path(out_dir)
    logs = out.parent / f"{out.name}-logs"
    if not resume and info.is_main:
        (logs / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run
    before = evaluate_reward_model(rm, val) if val else None
    start = time.time()
    objective = RewardObjective(train, rm.config.pad_token_id or 0, args)
    trainable = rm
    if args.lora.r > 0:
        torch.manual_seed(fit_args.seed)  # LoRA's initial A: the same on every rank (FSDP shards each rank's own)
        trainable = apply_lora(rm, args.lora)
        rm.head.requires_grad_(True)  # peft froze everything but the adapters; the head is new and trains in full
    res = fit(trainable, objective, logs, optim, fit_args, checkpoint or CheckpointArgs(), parallel, resume, info,
              progress=progress)
    if res.stopped_early:
        return {"steps": res.steps, "stopped_early": True}
    trained = res.model  # under torchrun still sharded: every rank scores and evaluates together
    trained.eval()
    # Normalisation constants for PPO: the score distribution over the training answers.
    sample = train[: 512]
    scores = score_rows(trained, [p.chosen for p in sample] + [p.rejected for p in sample])
    score_mean, score_std = float(scores.mean()), float(scores.std()) if len(scores) > 1 else 1.0
    after = evaluate_reward_model(trained, val) if val else None
    rm = plain_model(trained, info, empty=lambda config: RewardModel(Baichuan(config)))
    if rm is None:  # another rank under torchrun: rank 0 saves
        return {"steps": res.steps, "worker": True}
    rm.score_mean, rm.score_std = score_mean, score_std
    rm.save(out, tokenizer=tok, extra={"max_length": args.max_length, "taxonomy": Path(args.taxonomy).name})
    result = {"train_pairs": len(train), "val_pairs": len(val), "steps": res.steps,
              "seconds": round(time.time() - start, 1), "val_before": before, "val_after": after,
              "settings": asdict(args), "optim": asdict(optim)}
    atomic_write_json(logs / "rm_result.json", result)
    return result


def format_report(report: dict, top: int = 12) -> str:
    """Markdown tables: overall, primary categories, gap/margin buckets, the largest tertiary categories."""
    lines = [f"pairwise accuracy {report['accuracy']:.2f}% on {report['n']} pairs "
             f"(mean margin {report['mean_margin']:+.3f})", "", "| group | n | accuracy |", "|---|---:|---:|"]
    sections = [("by_primary", None), ("by_gap", None), ("by_margin_quantile", None), ("by_category", top)]
    for key, limit in sections:
        rows = sorted(report.get(key, {}).items(), key=lambda kv: -kv[1]["n"]) if limit else \
            list(report.get(key, {}).items())
        for name, r in rows[: limit or None]:
            extra = f" (|margin| {r['margin_range'][0]:.3f}-{r['margin_range'][1]:.3f})" if "margin_range" in r else ""
            lines.append(f"| {key[3:]}: {name}{extra} | {r['n']} | {r['accuracy']:.1f}% |")
    return "\n".join(lines)
