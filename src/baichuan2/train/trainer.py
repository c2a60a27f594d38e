"""Pretraining: ``pretrain(PretrainConfig) -> PretrainResult``, the first objective of the engine.

``PretrainObjective`` reads this rank's rows of the global batch (``data.step_rows``, a pure function of
the step) and returns the token-weighted cross-entropy + max-z loss; ``train.engine.fit`` does the rest
(bf16 autocast with fp32 master weights, micro-batch accumulation weighted by each micro-batch's share of
the global batch's target tokens, FSDP2/TP, clipping, warm-up + cosine, the bad-step policy, exact
resume).  Released HF checkpoints follow a token schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from baichuan2.train.data import LoaderState, PackedDataset, step_rows
from baichuan2.train.engine import (CheckpointArgs, FitArgs, Objective, TrainingError,  # noqa: F401 (re-exported)
                                    resolve_precision)
from baichuan2.train.optim import OptimArgs
from baichuan2.train.parallel import DistInfo, ParallelArgs
from baichuan2.utils.validate import require_ints


@dataclass
class ModelArgs:
    preset: str = "tiny-rope"  # a ModelConfig preset (baichuan2-7b, baichuan2-13b, ladder-*, scaling-*, tiny-*)
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields to change (vocab_size from data)
    init_from: str | None = None  # continue from a HF-layout checkpoint instead of random init

    def __post_init__(self) -> None:  # unknown preset / override key / wrongly typed value: one clear line now
        from baichuan2.model.config import ModelConfig

        if not self.init_from:
            ModelConfig.from_name(self.preset, **self.overrides)


@dataclass
class DataArgs:
    shards: str | list[str] = ""  # token shard directories (baichuan2 tokenizer encode)
    seq_len: int = 256
    source_weights: dict[str, float] = field(default_factory=dict)  # extra multiplier per source tag
    use_doc_weights: bool = True  # per-document sampling weights from the data pipeline
    val_shards: str | list[str] | None = None  # held-out shards for validation loss
    val_rows: int = 32
    # Read each epoch's rows in a seeded random order (Megatron's shuffle index); False keeps stream order,
    # where consecutive rows continue the same document.
    shuffle_rows: bool = True

    def __post_init__(self) -> None:
        require_ints(self, "data", "seq_len", "val_rows")


@dataclass
class TrainArgs(FitArgs):
    """Pretraining's loop settings: the engine's FitArgs plus the batch in tokens and the run's length.

    Args:
        global_batch_tokens: Tokens per optimizer step (all ranks together).
        max_steps: Optimizer steps (0: derived from max_tokens).
        max_tokens: Training tokens (when max_steps is 0).
    """

    global_batch_tokens: int = 16384
    micro_batch_size: int = 4
    max_steps: int = 0
    max_tokens: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_ints(self, "train", "global_batch_tokens", "micro_batch_size")
        require_ints(self, "train", "max_steps", "max_tokens", minimum=0)


@dataclass
class PretrainConfig:
    out_dir: str = "runs/pretrain"
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    resume: bool | str = False  # True: latest checkpoint in out_dir; or a checkpoint path


@dataclass
class PretrainResult:
    run_dir: str
    steps: int
    tokens: int
    final_loss: float  # last step's training loss
    smoothed_loss: float  # mean training loss over the last 10% of max_steps (scaling-law fits use this)
    val_loss: float | None
    release_dir: str | None
    flops_per_token: float
    stopped_early: bool = False


def build_model(cfg: PretrainConfig, vocab_size: int | None, device: torch.device):
    from baichuan2.model import Baichuan, ModelConfig, load_pretrained

    if cfg.model.init_from:
        model = load_pretrained(cfg.model.init_from, dtype="float32", **cfg.model.overrides)
    else:
        overrides = dict(cfg.model.overrides)
        if vocab_size and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        overrides.setdefault("max_position_embeddings", max(cfg.data.seq_len, 1))
        torch.manual_seed(cfg.train.seed)
        model = Baichuan(ModelConfig.from_name(cfg.model.preset, **overrides))
    if vocab_size and model.config.vocab_size < vocab_size:
        raise TrainingError(f"model vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's "
                            f"({vocab_size})")
    return model.to(device)


class PretrainObjective(Objective):
    """Next-token prediction on packed token shards: the rows of the global batch ``step`` (a pure function
    of the step, so resuming on any world size reads the same rows), token-weighted cross-entropy plus
    max-z loss, held-out loss, released checkpoints on a token schedule."""

    name = "pretrain"

    def __init__(self, cfg: PretrainConfig, dataset: PackedDataset, max_steps: int, rows_per_step: int,
                 val_batch: dict | None, tokenizer_dir: str | None, start_tokens: int = 0):
        self.cfg, self.dataset, self.max_steps, self.rows_per_step = cfg, dataset, max_steps, rows_per_step
        self.val_batch, self.tokenizer_dir, self.seq_len = val_batch, tokenizer_dir, cfg.data.seq_len
        self.info = DistInfo()
        self.val_loss: float | None = None
        self.release_dtype = {"auto": None, "float32": torch.float32,
                              "bfloat16": torch.bfloat16}[cfg.checkpoint.release_dtype]

    def setup(self, model, info: DistInfo) -> None:
        self.info, self.z_weight = info, model.config.z_loss_weight

    def total_steps(self) -> int:
        return self.max_steps

    def micro_batches(self, step: int, micro_batch_size: int) -> list[dict]:
        rows = step_rows(step * self.rows_per_step, self.rows_per_step, self.info.dp_rank, self.info.dp_world)
        batch = self.dataset.batch(rows)
        return [{k: v[s: s + micro_batch_size] for k, v in batch.items()}
                for s in range(0, len(rows), micro_batch_size)]

    def count(self, micro: dict) -> float:
        return int((micro["targets"] != -100).sum())

    def tokens(self, micro: dict) -> int:
        return int(micro["input_ids"].numel())

    def loss(self, model, micro: dict):
        device = self.info.device
        out = model(micro["input_ids"].to(device), micro["targets"].to(device),
                    attention_mask=micro["attention_mask"].to(device), return_logits=False)
        return out.loss, {"ce_loss": float(out.ce_loss), "z_loss": float(out.z_loss)}

    def summarize(self, sums: dict[str, float], count: float) -> dict[str, float]:
        n = max(count, 1.0)
        return {"loss": (sums["ce_loss"] + self.z_weight * sums["z_loss"]) / n, "ce_loss": sums["ce_loss"] / n,
                "z_loss": sums["z_loss"] / n}

    def evaluate(self, model, autocast) -> dict[str, float]:
        if self.val_batch is None:
            return {}
        self.val_loss = evaluate_loss(model, self.val_batch, self.cfg.train.micro_batch_size, self.info.device,
                                      autocast)
        return {"val_loss": self.val_loss}

    def after_step(self, model, step: int, metrics: dict, info: DistInfo) -> None:
        from baichuan2.train import checkpoint as ckpt

        every, tokens = self.cfg.checkpoint.release_every_tokens, metrics["tokens"]
        tokens_per_step = self.rows_per_step * self.seq_len
        if every and tokens // every > (tokens - tokens_per_step) // every:
            ckpt.release_checkpoint(self.cfg.out_dir, model, (tokens // every) * every, step, metrics["loss"],
                                    info.rank, self.tokenizer_dir, self.release_dtype)

    def state_dict(self, step: int) -> dict:
        return {"loader": LoaderState(step * self.rows_per_step).state_dict()}

    def flops_per_token(self, model) -> float:
        return model.config.flops_per_token(self.seq_len)


def pretrain(cfg: PretrainConfig, info: DistInfo | None = None) -> PretrainResult:
    from baichuan2.tokenizer.shards import read_manifest
    from baichuan2.train import checkpoint as ckpt
    from baichuan2.train.engine import fit
    from baichuan2.train.parallel import init_distributed
    from baichuan2.utils.io import atomic_write_text

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    info = info or init_distributed(cfg.parallel.tp, cfg.train.device)
    run_dir = Path(cfg.out_dir)
    t = cfg.train

    shard_dirs = [cfg.data.shards] if isinstance(cfg.data.shards, str) else list(cfg.data.shards)
    if not shard_dirs or not all(shard_dirs):
        raise TrainingError("data.shards is required (directories written by `baichuan2 tokenizer encode`)")
    dataset = PackedDataset(shard_dirs, cfg.data.seq_len, seed=t.seed, source_weights=cfg.data.source_weights,
                            use_doc_weights=cfg.data.use_doc_weights, shuffle_rows=cfg.data.shuffle_rows)
    manifest = read_manifest(shard_dirs[0]) or {}
    vocab_size = manifest.get("tokenizer", {}).get("vocab_size")
    tokenizer_path = manifest.get("tokenizer", {}).get("path")
    tokenizer_dir = str(Path(tokenizer_path).parent) if tokenizer_path and Path(tokenizer_path).exists() else None

    seq = cfg.data.seq_len
    rows_per_step = max(1, t.global_batch_tokens // seq)
    if rows_per_step % (info.dp_world * t.micro_batch_size):
        raise TrainingError(f"global batch of {rows_per_step} rows ({t.global_batch_tokens} tokens / seq_len {seq}) "
                            f"must be divisible by data-parallel ranks ({info.dp_world}) x micro_batch_size "
                            f"({t.micro_batch_size})")
    tokens_per_step = rows_per_step * seq
    max_steps = t.max_steps or math.ceil(t.max_tokens / tokens_per_step) if (t.max_steps or t.max_tokens) else 0
    if max_steps <= 0:
        raise TrainingError("set train.max_steps or train.max_tokens")

    model = build_model(cfg, vocab_size, info.device)
    model_cfg = model.config
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False,
                                                                  allow_unicode=True))
    val_batch = None
    if cfg.data.val_shards:
        val = PackedDataset(cfg.data.val_shards, seq, seed=0, use_doc_weights=False)
        # no row twice (PackedDataset already refuses a set shorter than one row)
        val_batch = val.batch(list(range(min(cfg.data.val_rows, val.rows_in_epoch(0)))))
    objective = PretrainObjective(cfg, dataset, max_steps, rows_per_step, val_batch, tokenizer_dir)
    banner = (f"pretraining {model_cfg.num_params() / 1e6:.2f}M params ({model_cfg.num_params(True) / 1e6:.2f}M "
              f"non-embedding), {tokens_per_step:,} tokens a step")
    res = fit(model, objective, run_dir, cfg.optim, t, cfg.checkpoint, cfg.parallel, cfg.resume, info, banner=banner)
    release_dir = None
    if res.steps >= max_steps and cfg.checkpoint.release_final:
        release_dir = ckpt.release_checkpoint(run_dir, res.model, res.tokens, res.steps, res.last_loss, info.rank,
                                              tokenizer_dir, objective.release_dtype, name="final")
    # res.losses holds at least the last 10% of max_steps even across a resume (the engine checkpoints
    # that tail), so a resumed run reports the same numbers as an uninterrupted one
    tail = res.losses[-max(1, max_steps // 10):] or [float("nan")]
    return PretrainResult(run_dir=str(run_dir), steps=res.steps, tokens=res.tokens, final_loss=res.last_loss,
                          smoothed_loss=sum(tail) / len(tail), val_loss=res.evals.get("val_loss", objective.val_loss),
                          release_dir=str(release_dir) if release_dir else None,
                          flops_per_token=model_cfg.flops_per_token(seq), stopped_early=res.stopped_early)


@torch.no_grad()
def evaluate_loss(model, batch: dict[str, torch.Tensor], micro_batch_size: int, device: torch.device,
                  autocast=contextlib.nullcontext()) -> float:
    """Mean cross-entropy over the batch's targets (-100 ignored), in micro-batches; restores the model's mode."""
    was_training = model.training
    model.eval()
    ce_sum, n_sum = 0.0, 0.0
    for start in range(0, batch["input_ids"].shape[0], micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        inputs = {k: v[sl].to(device) for k, v in batch.items()}
        n = int((inputs["targets"] != -100).sum())
        with autocast:
            out = model(inputs["input_ids"], inputs["targets"], attention_mask=inputs["attention_mask"],
                        return_logits=False)
        ce_sum += float(out.ce_loss) * n
        n_sum += n
    model.train(was_training)
    return ce_sum / max(n_sum, 1.0)
