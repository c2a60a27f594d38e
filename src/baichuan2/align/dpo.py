"""Direct preference optimisation (Rafailov et al. 2023), the first step of Baichuan 2's safety stage.

Loss over a pair with policy log-probabilities ``pi_c, pi_r`` of the chosen / rejected responses and the
reference model's ``ref_c, ref_r`` (sums over the response tokens)::

    delta = (pi_c - ref_c) - (pi_r - ref_r)
    sigmoid (DPO):  -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)   (eps: label smoothing, cDPO)
    ipo:            (delta_per_token - 1 / (2 beta))^2, with each log-ratio divided by its response length

The implicit reward of a response is ``beta (pi - ref)``; held-out preference accuracy is how often the
chosen response gets the higher one.  Reference log-probabilities are computed once before training and
cached to disk (``reference: precompute``; the reference need not stay in memory), or taken from a frozen
copy of the model on every step (``reference: model``).  Log-probabilities are computed in chunks of
positions (``token_logprobs``): no ``[batch, seq, vocab]`` tensor exists, in the forward or the backward.
Pairs are read in every layout ``rm`` reads (``align/preference.py``); only the final assistant turn is
scored (earlier turns are prompt).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from baichuan2.align.logprobs import causal_lm, sequence_logprobs, token_logprobs  # noqa: F401
from baichuan2.align.sft import LoraArgs, _finite, apply_lora, plain_model, split_holdout
from baichuan2.train.engine import CheckpointArgs, EpochObjective, FitArgs
from baichuan2.train.optim import OptimArgs
from baichuan2.train.parallel import ParallelArgs
from baichuan2.utils.io import InputError, atomic_write_json

REF_CACHE = "reference_logps.safetensors"


@dataclass
class DPOArgs:
    """Args:
        max_length: Tokens per sequence (left-truncated, so the response survives).
        epochs: Passes over the training pairs.
        batch_size: Pairs per optimizer step, all ranks together.
        beta: Strength of the KL regularisation (DPO's beta; 0.1 as in the paper and TRL).
        label_smoothing: Assumed share of flipped labels (conservative DPO); 0 = plain DPO.
        loss_type: sigmoid (DPO) | ipo.
        reference: precompute (reference log-probs computed once and cached to disk) | model (a frozen copy
            of the starting model stays in memory).
        val_fraction: Share of pairs held out for the implicit-reward accuracy.
        seed: Split and shuffle seed.
        lora: LoRA settings (r = 0: full fine-tuning).
    """

    max_length: int = 512
    epochs: int = 1
    batch_size: int = 16
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    reference: Literal["precompute", "model"] = "precompute"
    val_fraction: float = 0.1
    seed: int = 0
    lora: LoraArgs = field(default_factory=LoraArgs)


def dpo_optim(**changes) -> OptimArgs:
    """DPO's optimiser defaults: peak LR 5e-7, 10% warm-up, cosine to 10%, no weight decay, clip 1.0."""
    return dataclasses.replace(OptimArgs(lr=5e-7, warmup_steps=0, warmup_frac=0.1, weight_decay=0.0,
                                         grad_clip=1.0), **changes)


# ------------------------------------------------------------------------------------------------
# The maths
# ------------------------------------------------------------------------------------------------

def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid", chosen_len: torch.Tensor | None = None,
             rejected_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(per-pair loss [n], chosen rewards [n], rejected rewards [n])``; rewards are ``beta * log-ratio``."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "ipo":
        if chosen_len is None or rejected_len is None:
            raise ValueError("ipo needs the response lengths")
        delta = chosen_ratio / chosen_len.clamp(min=1) - rejected_ratio / rejected_len.clamp(min=1)
        loss = (delta - 1 / (2 * beta)) ** 2
    else:
        raise InputError(f"unknown DPO loss_type {loss_type!r} (sigmoid or ipo)")
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

@dataclass
class DPOPair:
    chosen: tuple[list[int], list[int]]  # (ids, targets on the final response only)
    rejected: tuple[list[int], list[int]]


def final_turn_targets(ids: list[int], targets: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Left-truncate to ``max_length`` and keep loss only on the last assistant turn (earlier turns are prompt)."""
    ids, targets = ids[-max_length:], targets[-max_length:]
    out, k = [-100] * len(targets), len(targets) - 1
    while k >= 0 and targets[k] == -100:
        k -= 1
    while k >= 0 and targets[k] != -100:
        out[k] = targets[k]
        k -= 1
    return ids, out


def encode_dpo_pairs(tok, pairs, max_length: int) -> list[DPOPair]:
    from baichuan2.tokenizer.chat import encode_chat

    out = []
    for p in pairs:
        c = final_turn_targets(*encode_chat(tok, p.chosen), max_length)
        r = final_turn_targets(*encode_chat(tok, p.rejected), max_length)
        if c == r or all(t == -100 for t in c[1]) or all(t == -100 for t in r[1]):
            continue  # no preference signal left after truncation
        out.append(DPOPair(c, r))
    return out


def pair_batch(pairs: Sequence[DPOPair], pad: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded: one forward pass for both."""
    from baichuan2.align.sft import _batch

    b = _batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "targets": b["targets"]}


@torch.no_grad()
def reference_logprobs(model, pairs: Sequence[DPOPair], pad: int, device, batch_size: int = 8,
                       autocast=None, info=None) -> torch.Tensor:
    """``[n, 2]`` (chosen, rejected) summed log-probabilities under ``model``.

    Under torchrun (``info.distributed``, ``model`` not yet parallelised) the batches are dealt out over the
    ranks and the results summed across them: each batch is computed exactly as on one process."""
    import contextlib

    rank, world = (info.rank, info.world) if info is not None and info.distributed else (0, 1)
    was = model.training
    model.eval()
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for j, s in enumerate(range(0, len(pairs), batch_size)):
        if j % world != rank:
            continue
        b = pair_batch(pairs[s:s + batch_size], pad)
        with autocast or contextlib.nullcontext():
            lp = sequence_logprobs(model, *(b[k].to(device) for k in ("input_ids", "attention_mask", "targets")))
        n = lp.shape[0] // 2
        out[s:s + n, 0], out[s:s + n, 1] = lp[:n].double().cpu(), lp[n:].double().cpu()
    model.train(was)
    if world > 1:
        import torch.distributed as dist

        total = out.to(info.device)
        dist.all_reduce(total)
        out = total.cpu()
    return out


def _fingerprint(model, pairs: Sequence[DPOPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(repr((p.chosen, p.rejected)).encode())
    for t in list(causal_lm(model).state_dict().values())[:4]:
        h.update(t.detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()


def cached_reference(path: Path, model, pairs: Sequence[DPOPair], pad: int, device, autocast=None,
                     info=None) -> torch.Tensor:
    """Reference log-probabilities of ``pairs``, read from ``path`` when it matches (data + model fingerprint);
    under torchrun every rank computes its share and rank 0 writes the cache."""
    from safetensors.torch import load_file, save_file

    from baichuan2.train.parallel import all_reduce_sum

    key = _fingerprint(model, pairs)
    cached = None
    if path.exists():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                if (fh.metadata() or {}).get("fingerprint") == key:
                    cached = load_file(str(path))["logps"]
        except Exception:  # a damaged cache is recomputed, never trusted
            cached = None
    if info is not None and info.distributed:  # all ranks read it, or all compute (they share the work)
        (hits,) = all_reduce_sum([float(cached is not None)], info)
        cached = cached if hits == info.world else None
    if cached is not None:
        return cached
    logps = reference_logprobs(model, pairs, pad, device, autocast=autocast, info=info)
    if info is not None and not info.is_main:
        return logps
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"logps": logps}, str(tmp), metadata={"fingerprint": key})
    tmp.replace(path)
    return logps


class DPOObjective(EpochObjective):
    """The DPO loss averaged over pairs (micro-batches and ranks weighted by pairs)."""

    name = "dpo"

    def __init__(self, train: Sequence[DPOPair], val: Sequence[DPOPair], pad: int, args: DPOArgs,
                 ref_train: torch.Tensor | None, ref_val: torch.Tensor | None, reference_model=None,
                 parallel: ParallelArgs | None = None):
        # each example carries its index, so its cached reference log-probs travel with it
        super().__init__(list(enumerate(train)), args.batch_size, args.epochs, args.seed)
        self.val, self.pad, self.args, self.seq_len = list(val), pad, args, args.max_length
        self.ref_train, self.ref_val, self.reference = ref_train, ref_val, reference_model
        self.parallel = parallel or ParallelArgs()

    def setup(self, model, info) -> None:
        super().setup(model, info)
        if self.reference is not None:  # the frozen reference is sharded like the policy (not a full copy per rank)
            from baichuan2.train.parallel import parallelize

            self.reference = parallelize(self.reference.to(info.device), info, self.parallel)

    def make_micro(self, examples: list, real: bool) -> dict:
        b = pair_batch([p for _, p in examples], self.pad)
        b["ref"] = self.ref_train[[i for i, _ in examples]] if self.ref_train is not None else None
        b["count"] = len(examples) if real else 0
        return b

    def _ref(self, micro: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.info.device
        if micro.get("ref") is not None:
            ref = micro["ref"].to(device, torch.float32)
            return ref[:, 0], ref[:, 1]
        with torch.no_grad():
            lp = sequence_logprobs(self.reference, *(micro[k].to(device) for k in
                                                     ("input_ids", "attention_mask", "targets"))).float()
        n = lp.shape[0] // 2
        return lp[:n], lp[n:]

    def pair_terms(self, model, micro: dict):
        device = self.info.device
        ids, mask, tgt = (micro[k].to(device) for k in ("input_ids", "attention_mask", "targets"))
        lp = sequence_logprobs(model, ids, mask, tgt).float()
        n = lp.shape[0] // 2
        ref_c, ref_r = self._ref(micro)
        lengths = (tgt != -100).sum(-1).float()
        a = self.args
        loss, rc, rr = dpo_loss(lp[:n], lp[n:], ref_c, ref_r, a.beta, a.label_smoothing, a.loss_type,
                                lengths[:n], lengths[n:])
        kl = 0.5 * ((ref_c - lp[:n].detach()) + (ref_r - lp[n:].detach()))
        return loss, rc, rr, kl

    def loss(self, model, micro: dict):
        loss, rc, rr, kl = self.pair_terms(model, micro)
        loss = loss.mean()
        return loss, {"loss": float(loss.detach()), "rewards/chosen": float(rc.mean()),
                      "rewards/rejected": float(rr.mean()), "margin": float((rc - rr).mean()),
                      "accuracy": float(((rc > rr).float() + 0.5 * (rc == rr).float()).mean()),
                      "kl_proxy": float(kl.mean())}

    @torch.no_grad()
    def evaluate(self, model, autocast) -> dict[str, float]:
        if not self.val:
            return {}
        was = model.training
        model.eval()
        sums, n = {}, 0
        for s in range(0, len(self.val), 8):
            micro = pair_batch(self.val[s:s + 8], self.pad)
            micro["ref"] = self.ref_val[s:s + 8] if self.ref_val is not None else None
            with autocast:
                _, stats = self.loss(model, micro)
            k = len(self.val[s:s + 8])
            for key, v in stats.items():
                sums[key] = sums.get(key, 0.0) + v * k
            n += k
        model.train(was)
        return {f"val_{k}": v / n for k, v in sums.items()}


def dpo(model, tok, pairs, out_dir: str | Path, args: DPOArgs = DPOArgs(), progress: bool = True,
        optim: OptimArgs | None = None, fit_args: FitArgs | None = None, checkpoint: CheckpointArgs | None = None,
        parallel: ParallelArgs | None = None, resume: bool | str = False, val_pairs=None) -> dict:
    """DPO-train ``model`` on preference ``pairs`` (``align.preference.Pair``); save it to ``out_dir``.

    ``out_dir-logs/`` gets metrics.jsonl (+ TensorBoard), the reference log-prob cache, training checkpoints
    and dpo_result.json (held-out implicit-reward accuracy before and after)."""
    from baichuan2.model.checkpoint import save_pretrained
    from baichuan2.model.generate import chat_generation_config
    from baichuan2.train.engine import autocast_for, fit, resolve_precision
    from baichuan2.train.parallel import init_distributed

    if not args.beta > 0:
        raise InputError(f"beta must be > 0, got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        raise InputError(f"label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
    optim, fit_args, parallel = optim or dpo_optim(), fit_args or FitArgs(precision="fp32"), parallel or ParallelArgs()
    info = init_distributed(parallel.tp, fit_args.device)
    limit = min(args.max_length, model.config.max_position_embeddings)
    encoded = encode_dpo_pairs(tok, pairs, limit)
    if val_pairs is not None:
        train, val = encoded, encode_dpo_pairs(tok, val_pairs, limit)
    else:
        train, val = split_holdout(encoded, args.val_fraction, args.seed)
    if not train:
        raise InputError("no usable preference pairs (each needs a final assistant turn that differs)")
    pad = model.config.pad_token_id or 0
    out = Path(out_dir)
    logs = out.parent / f"{out.name}-logs"
    if not resume and info.is_main:
        (logs / "metrics.jsonl").unlink(missing_ok=True)
    model = model.to(info.device)
    autocast = autocast_for(resolve_precision(fit_args.precision, info.device), info.device)
    reference = None
    if args.reference == "precompute":
        ref_all = cached_reference(logs / REF_CACHE, model, train + val, pad, info.device, autocast, info)
        ref_train, ref_val = ref_all[: len(train)], ref_all[len(train):]
    else:
        ref_train = ref_val = None
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    start = time.time()
    torch.manual_seed(fit_args.seed)  # LoRA's initial A: the same on every rank (FSDP shards each rank's own)
    trainable = apply_lora(model, args.lora) if args.lora.r > 0 else model
    objective = DPOObjective(train, val, pad, dataclasses.replace(args, max_length=limit), ref_train, ref_val,
                             reference, parallel)
    objective.info = info
    before = objective.evaluate(trainable, autocast)
    res = fit(trainable, objective, logs, optim, fit_args, checkpoint or CheckpointArgs(), parallel, resume, info,
              progress=progress)
    if res.stopped_early:
        return {"steps": res.steps, "stopped_early": True}
    after = res.evals or objective.evaluate(res.model, autocast)
    model = plain_model(res.model, info)
    if model is None:  # another rank under torchrun: rank 0 saves
        return {"steps": res.steps, "worker": True}
    save_pretrained(model.eval(), out, tokenizer=tok, overwrite=True, generation_config=chat_generation_config(tok, pad))
    result = {"train_pairs": len(train), "val_pairs": len(val), "steps": res.steps,
              "seconds": round(time.time() - start, 1), "tokens_per_s": _finite(res.tokens_per_s, 1),
              "mfu": _finite(res.mfu, 4), "val_before": before, "val_after": after,
              "settings": asdict(args), "optim": asdict(optim)}
    atomic_write_json(logs / "dpo_result.json", result)
    return result
