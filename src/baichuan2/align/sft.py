"""Supervised fine-tuning in Baichuan 2's chat format, with loss on assistant tokens only.

Conversations become ``[195] user [196] assistant eos ...`` ids (``tokenizer.chat.encode_chat``, the
official fine-tune.py semantics); user and system tokens carry no loss. Accepted inputs (JSON or JSONL,
auto-detected per record): ``{"messages": [{"role", "content"}]}``, ShareGPT
``{"conversations": [{"from", "value"}]}`` and Alpaca ``{"instruction", "input", "output"}``.
Full fine-tuning, or LoRA through ``peft`` (merged into the weights when saved, so the output is a
plain checkpoint). Training runs on the engine (``train.engine.fit``: bf16, micro-batches weighted by
assistant tokens, FSDP2/TP under torchrun, the bad-step policy, exact resume). The result is an
HF-layout directory with the tokenizer, written atomically.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from baichuan2.tokenizer.chat import encode_chat
from baichuan2.train.engine import (CheckpointArgs, EpochObjective, FitArgs,  # noqa: F401 (re-exported)
                                    epoch_batches, rank_share)
from baichuan2.train.optim import OptimArgs
from baichuan2.train.parallel import ParallelArgs
from baichuan2.utils.io import InputError, atomic_write_json, iter_records

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_messages(record: dict, where: str = "record") -> list[dict]:
    """One training record in any supported format -> Baichuan messages."""
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if "conversations" in record:
        out = []
        for m in record["conversations"]:
            role = SHAREGPT_ROLES.get(str(m.get("from", "")).lower())
            if role is None:
                raise InputError(f"{where}: unknown ShareGPT speaker {m.get('from')!r}")
            out.append({"role": role, "content": m.get("value", "")})
        return out
    if "instruction" in record and "output" in record:
        prompt = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    raise InputError(f"{where}: expected 'messages', 'conversations' or 'instruction'/'output' fields")


def read_conversations(paths: Sequence[str]) -> Iterator[list[dict]]:
    """Records from JSON-array files or JSONL (also .gz/.zst); bad JSON or UTF-8 is an InputError naming the place."""
    for path in paths:
        for where, record in iter_records(path):
            yield to_messages(record, where)


@dataclass
class LoraArgs:
    """Args:
        r: LoRA rank (0 = full fine-tuning).
        alpha: LoRA scaling numerator.
        dropout: LoRA dropout.
        targets: Module names that get adapters.
    """

    r: int = 0
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class SFTArgs:
    """Args:
        max_length: Longest training sequence in tokens (longer conversations are truncated).
        epochs: Passes over the data.
        batch_size: Conversations (or packed rows) per optimizer step, all ranks together.
        val_fraction: Share of conversations held out for the validation loss.
        seed: Shuffle and split seed.
        pack: Pack whole conversations into max_length rows (best-fit decreasing); each keeps its own
            attention segment and positions, so nothing attends across conversations.
        lora: LoRA settings (r = 0: full fine-tuning).
    """

    max_length: int = 512
    epochs: int = 1
    batch_size: int = 8
    val_fraction: float = 0.05
    seed: int = 0
    pack: bool = False
    lora: LoraArgs = field(default_factory=LoraArgs)


def sft_optim(**changes) -> OptimArgs:
    """SFT's optimiser defaults: peak LR 2e-5, 3% warm-up, cosine to 10%, no weight decay, clip 1.0."""
    return dataclasses.replace(OptimArgs(lr=2e-5, warmup_steps=0, warmup_frac=0.03, weight_decay=0.0,
                                         grad_clip=1.0), **changes)


def split_holdout(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """``(train, held_out)``: a seeded shuffle, then ``fraction`` of the items (at least one) held out."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_val = max(1, int(fraction * len(items))) if fraction > 0 else 0
    return items[n_val:], items[:n_val]


def _batch(rows: list[tuple], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; rows are (ids, targets) or packed (ids, targets, segment ids)."""
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    tgt = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r[0])
        ids[i, :n], tgt[i, :n] = torch.tensor(r[0]), torch.tensor(r[1])
        mask[i, :n] = torch.tensor(r[2]) if len(r) > 2 else 1
    return {"input_ids": ids, "targets": tgt, "attention_mask": mask}


def pack_rows(rows: Sequence[tuple[list[int], list[int]]], max_length: int) -> list[tuple[list, list, list]]:
    """Best-fit-decreasing packing of whole conversations into rows of at most ``max_length`` tokens.

    A packed row carries segment ids 1, 2, ... (the model's attention mask), so each conversation sees
    only itself and its positions restart at 0; its last target is -100, so no loss crosses a boundary.
    """
    import bisect

    frees: list[tuple[int, int]] = []  # (free tokens, bin index), sorted
    bins: list[list[tuple]] = []
    for r in sorted(rows, key=lambda r: -len(r[0])):
        k = bisect.bisect_left(frees, (len(r[0]), -1))
        if k == len(frees):
            bins.append([])
            free, b = max_length, len(bins) - 1
        else:
            free, b = frees.pop(k)
        bins[b].append(r)
        bisect.insort(frees, (free - len(r[0]), b))
    packed = []
    for members in bins:
        ids, tgt, seg = [], [], []
        for k, (a, t) in enumerate(members, start=1):
            ids += a
            tgt += t
            seg += [k] * len(a)
        packed.append((ids, tgt, seg))
    return packed


def assistant_loss(model, rows: list[tuple[list[int], list[int]]], pad: int, batch_size: int = 8) -> float:
    """Mean cross-entropy over assistant tokens (the SFT objective without the z-loss)."""
    from baichuan2.train.trainer import evaluate_loss

    return evaluate_loss(model, _batch(rows, pad), batch_size, model.device)


class SFTObjective(EpochObjective):
    """Cross-entropy on the assistant's tokens, weighted by target tokens across micro-batches and ranks."""

    name = "sft"

    def __init__(self, train: list[tuple], val: list[tuple], pad: int, args: SFTArgs):
        super().__init__(train, args.batch_size, args.epochs, args.seed)
        self.val, self.pad, self.seq_len = val, pad, args.max_length

    def make_micro(self, examples: list, real: bool) -> dict:
        b = _batch(examples, self.pad)
        b["count"] = int((b["targets"] != -100).sum()) if real else 0
        return b

    def loss(self, model, micro: dict):
        device = self.info.device
        res = model(micro["input_ids"].to(device), micro["targets"].to(device),
                    attention_mask=micro["attention_mask"].to(device), return_logits=False)
        return res.loss, {"loss": float(res.ce_loss)}

    def evaluate(self, model, autocast) -> dict[str, float]:
        from baichuan2.train.trainer import evaluate_loss

        if not self.val:
            return {}
        return {"val_loss": evaluate_loss(model, _batch(self.val, self.pad), 8, self.info.device, autocast)}


def apply_lora(model, lora: LoraArgs):
    """``model`` wrapped with trainable LoRA adapters (peft); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=list(lora.targets)))


def plain_model(trained, info=None, empty=None):
    """The trained model as a plain single-process module: LoRA adapters merged, FSDP/TP shards gathered
    (every rank must call; under torchrun rank 0 gets the whole model on CPU, the other ranks ``None``).

    ``empty(config)`` builds the bare module the gathered weights go into (default ``Baichuan``; the reward
    model passes its own)."""
    if hasattr(trained, "merge_and_unload"):
        trained = trained.merge_and_unload()
    if info is None or not info.distributed:
        return trained
    from baichuan2.model.model import Baichuan
    from baichuan2.train.checkpoint import full_model_state

    state = full_model_state(trained)
    if not info.is_main:
        return None
    with torch.device("meta"):
        cpu_model = (empty or Baichuan)(trained.config)
    cpu_model.load_state_dict(state, assign=True)
    return cpu_model


def _finite(value: float, digits: int) -> float | None:
    """A figure for a result JSON: rounded, or null when unknown (NaN, e.g. an unlisted GPU's peak)."""
    return round(value, digits) if math.isfinite(value) else None


def sft(model, tok, conversations: Sequence[list[dict]], out_dir: str | Path, args: SFTArgs = SFTArgs(),
        progress: bool = True, optim: OptimArgs | None = None, fit_args: FitArgs | None = None,
        checkpoint: CheckpointArgs | None = None, parallel: ParallelArgs | None = None,
        resume: bool | str = False) -> dict:
    """Fine-tune ``model`` on ``conversations`` with the training engine; save to ``out_dir``; return metrics.

    ``out_dir-logs/`` holds metrics.jsonl (+ TensorBoard), the training checkpoints and sft_result.json."""
    from baichuan2.model.checkpoint import save_pretrained
    from baichuan2.model.generate import chat_generation_config
    from baichuan2.train.engine import autocast_for, fit, resolve_precision
    from baichuan2.train.parallel import init_distributed

    optim = optim or sft_optim()
    fit_args = fit_args or FitArgs(precision="fp32")
    parallel = parallel or ParallelArgs()
    info = init_distributed(parallel.tp, fit_args.device)
    limit = min(args.max_length, model.config.max_position_embeddings)
    rows = [encode_chat(tok, msgs, limit) for msgs in conversations]
    rows = [r for r in rows if any(t != -100 for t in r[1])]  # nothing to learn without assistant tokens
    if len(rows) < 2:
        raise InputError(f"need at least 2 conversations with an assistant turn, got {len(rows)}")
    train, val = split_holdout(rows, args.val_fraction, args.seed)
    if args.pack:
        train = pack_rows(train, limit)
    pad = model.config.pad_token_id or 0

    out = Path(out_dir)
    logs = out.parent / f"{out.name}-logs"
    if not resume and info.is_main:
        (logs / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run
    objective = SFTObjective(train, val, pad, dataclasses.replace(args, max_length=limit))
    objective.info = info
    # before and after training: the same evaluation, at the run's precision
    before = objective.evaluate(model.to(info.device), autocast_for(resolve_precision(fit_args.precision,
                                                                                      info.device), info.device))
    before = before.get("val_loss")
    torch.manual_seed(fit_args.seed)  # LoRA's initial A: the same on every rank (FSDP shards each rank's own)
    trainable = apply_lora(model, args.lora) if args.lora.r > 0 else model
    start = time.time()
    res = fit(trainable, objective, logs, optim, fit_args, checkpoint or CheckpointArgs(), parallel, resume, info,
              progress=progress)
    if res.stopped_early:
        return {"steps": res.steps, "stopped_early": True}
    # the engine's final evaluation is the held-out loss after training (on the still-parallel model: no
    # single-process pass over the validation set on rank 0)
    after = res.evals.get("val_loss") if val else None
    model = plain_model(res.model, info)
    if model is None:  # another rank under torchrun: rank 0 saves
        return {"steps": res.steps, "worker": True}
    model.eval()
    save_pretrained(model, out, tokenizer=tok, overwrite=True, generation_config=chat_generation_config(tok, pad))
    metrics = {"train_conversations": len(rows) - len(val), "train_rows": len(train), "val_conversations": len(val),
               "steps": res.steps, "val_loss_before": before, "val_loss_after": after,
               "seconds": round(time.time() - start, 1), "tokens_per_s": _finite(res.tokens_per_s, 1),
               "mfu": _finite(res.mfu, 4), "lora_r": args.lora.r, "settings": asdict(args),
               "optim": asdict(optim)}
    atomic_write_json(logs / "sft_result.json", metrics)
    return metrics
