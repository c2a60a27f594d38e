"""Supervised fine-tuning in Baichuan 2's chat format, with loss on assistant tokens only.

Conversations become ``[195] user [196] assistant eos ...`` ids (``tokenizer.chat.encode_chat``, the
official fine-tune.py semantics); user and system tokens carry no loss. Accepted inputs (JSON or JSONL,
auto-detected per record): ``{"messages": [{"role", "content"}]}``, ShareGPT
``{"conversations": [{"from", "value"}]}`` and Alpaca ``{"instruction", "input", "output"}``.
Full fine-tuning, or LoRA through ``peft`` (merged into the weights when saved, so the output is a
plain checkpoint). The result is an HF-layout directory with the tokenizer, written atomically.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from baichuan2.tokenizer.chat import encode_chat
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
        batch_size: Conversations per optimizer step.
        lr: Peak learning rate (linear warm-up, cosine decay to 10%).
        warmup_frac: Warm-up as a fraction of the steps.
        weight_decay: AdamW weight decay.
        grad_clip: Gradient-norm clip.
        val_fraction: Share of conversations held out for the validation loss.
        seed: Shuffle and split seed.
        pack: Pack whole conversations into max_length rows (best-fit decreasing); each keeps its own
            attention segment and positions, so nothing attends across conversations.
        lora: LoRA settings (r = 0: full fine-tuning).
    """

    max_length: int = 512
    epochs: int = 1
    batch_size: int = 8
    lr: float = 2e-5
    warmup_frac: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    val_fraction: float = 0.05
    seed: int = 0
    pack: bool = False
    lora: LoraArgs = field(default_factory=LoraArgs)


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


def sft(model, tok, conversations: Sequence[list[dict]], out_dir: str | Path, args: SFTArgs = SFTArgs(),
        progress: bool = True) -> dict:
    """Fine-tune ``model`` in place on ``conversations``; save the result to ``out_dir``; return metrics."""
    from tqdm import tqdm

    from baichuan2.model.checkpoint import save_pretrained
    from baichuan2.model.generate import SamplingConfig
    from baichuan2.train.optim import OptimArgs, lr_at, set_lr
    from baichuan2.utils.metrics import MetricsLogger

    limit = min(args.max_length, model.config.max_position_embeddings)
    rows = [encode_chat(tok, msgs, limit) for msgs in conversations]
    rows = [r for r in rows if any(t != -100 for t in r[1])]  # nothing to learn without assistant tokens
    if len(rows) < 2:
        raise InputError(f"need at least 2 conversations with an assistant turn, got {len(rows)}")
    train, val = split_holdout(rows, args.val_fraction, args.seed)
    if args.pack:
        train = pack_rows(train, limit)
    steps = max(1, math.ceil(len(train) / args.batch_size) * args.epochs)
    pad = model.config.pad_token_id or 0

    trainable = model
    if args.lora.r > 0:
        from peft import LoraConfig, get_peft_model

        trainable = get_peft_model(model, LoraConfig(r=args.lora.r, lora_alpha=args.lora.alpha,
                                                     lora_dropout=args.lora.dropout,
                                                     target_modules=list(args.lora.targets)))
    params = [p for p in trainable.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    schedule = OptimArgs(lr=args.lr, min_lr_ratio=0.1, warmup_steps=max(1, int(args.warmup_frac * steps)))

    out = Path(out_dir)
    logger = MetricsLogger(out.parent / f"{out.name}-logs", tensorboard=False)
    before = assistant_loss(model, val, pad) if val else None
    trainable.train()
    start, step = time.time(), 0
    bar = tqdm(total=steps, desc="sft", unit="step", disable=not progress)
    rng = random.Random(args.seed + 1)
    for _ in range(args.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for k in range(0, len(order), args.batch_size):
            b = _batch([train[i] for i in order[k: k + args.batch_size]], pad)
            set_lr(opt, lr_at(step, schedule, steps))
            res = trainable(b["input_ids"].to(model.device), b["targets"].to(model.device),
                            attention_mask=b["attention_mask"].to(model.device), return_logits=False)
            res.loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            logger.log(step, loss=float(res.ce_loss), lr=lr_at(step - 1, schedule, steps), grad_norm=float(norm))
            bar.update(1)
            bar.set_postfix(loss=f"{float(res.ce_loss):.3f}")
    bar.close()
    if args.lora.r > 0:
        model = trainable.merge_and_unload()
    model.eval()
    after = assistant_loss(model, val, pad) if val else None
    chat = SamplingConfig.chat(stop_token_ids=[tok.eos_id])  # Baichuan 2-Chat's sampling defaults
    save_pretrained(model, out, tokenizer=tok, overwrite=True,
                    generation_config=chat.to_generation_config(pad, tok.bos_id, tok.eos_id, tok.user_id, tok.assistant_id))
    metrics = {"train_conversations": len(rows) - len(val), "train_rows": len(train), "val_conversations": len(val), "steps": step,
               "val_loss_before": before, "val_loss_after": after, "seconds": round(time.time() - start, 1),
               "lora_r": args.lora.r, "settings": asdict(args)}
    atomic_write_json(out.parent / f"{out.name}-logs" / "sft_result.json", metrics)
    return metrics
