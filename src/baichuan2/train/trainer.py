"""The pretraining loop: one plain function, ``pretrain(PretrainConfig) -> PretrainResult``.

Per step: read this rank's rows of the global batch (``data.step_rows``), run
micro-batches under bf16 autocast (fp32 master weights and optimizer state;
RoPE and norms are fp32 inside the model), weight each micro-batch's loss by
its share of the global batch's target tokens (so the loss is a token mean
whatever the micro-batching or world size), clip the global gradient norm,
set the LR from the step (warm-up + cosine: no scheduler state to lose) and
step AdamW.  A non-finite loss or gradient skips the step (nothing is
applied, nothing is saved) and too many in a row stop the run with a message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from baichuan2.train.data import LoaderState, PackedDataset, step_rows
from baichuan2.train.optim import OptimArgs, build_optimizer, lr_at, set_lr
from baichuan2.train.parallel import DistInfo, ParallelArgs, all_reduce_sum, clip_grad_norm
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
class TrainArgs:
    global_batch_tokens: int = 16384
    micro_batch_size: int = 4
    max_steps: int = 0  # 0: derived from max_tokens
    max_tokens: int = 0
    stop_after: int = 0  # stop (and checkpoint) after this many steps in this session; 0 = run to the end
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the hardware has it natively
    compile: bool = False  # torch.compile each decoder layer
    activation_checkpointing: bool = False
    log_every: int = 1
    eval_every: int = 0
    max_bad_steps: int = 5  # consecutive non-finite steps before giving up
    device: str = "auto"
    seed: int = 0
    threads: int = 0  # torch CPU threads (0 = default)

    def __post_init__(self) -> None:
        require_ints(self, "train", "global_batch_tokens", "micro_batch_size", "log_every", "max_bad_steps")
        require_ints(self, "train", "max_steps", "max_tokens", "stop_after", "eval_every", "threads", minimum=0)


@dataclass
class CheckpointArgs:
    save_every: int = 0  # steps between training-state checkpoints (0 = only at the end)
    keep_last: int = 2
    release_every_tokens: int = 0  # release a HF checkpoint each time this many more tokens are seen
    release_final: bool = True
    release_dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    def __post_init__(self) -> None:
        require_ints(self, "checkpoint", "save_every", "keep_last", "release_every_tokens", minimum=0)


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


class TrainingError(RuntimeError):
    pass


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if _cpu_has_native_bf16() else "fp32"


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


def pretrain(cfg: PretrainConfig, info: DistInfo | None = None) -> PretrainResult:
    from tqdm import tqdm

    from baichuan2.tokenizer.shards import read_manifest
    from baichuan2.train import checkpoint as ckpt
    from baichuan2.train.mfu import peak_flops
    from baichuan2.train.parallel import init_distributed, parallelize
    from baichuan2.utils.io import atomic_write_text
    from baichuan2.utils.metrics import MetricsLogger

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    info = info or init_distributed(cfg.parallel.tp, cfg.train.device)
    run_dir = Path(cfg.out_dir)
    t = cfg.train
    precision = resolve_precision(t.precision, info.device)

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
    if t.activation_checkpointing:
        model.model.gradient_checkpointing = True
    model = parallelize(model, info, cfg.parallel)
    if t.compile:
        for layer in model.model.layers:
            layer.compile()
    optimizer = build_optimizer(model, cfg.optim)

    start_step, next_row, tokens_seen, bad_streak = 0, 0, 0, 0
    resume_from, state = None, {}
    if cfg.resume:
        resume_from = Path(cfg.resume) if isinstance(cfg.resume, str) else (ckpt.checkpoint_dirs(run_dir) or [None])[-1]
        if resume_from is None:
            if info.is_main:
                print(f"no checkpoint in {run_dir}/checkpoints; starting from scratch")
        else:
            state = ckpt.load_training_state(resume_from, model, optimizer, info.rank)
            start_step, next_row = state["step"], state["loader"]["next_row"]
            tokens_seen, bad_streak = state["tokens"], state.get("bad_streak", 0)
    logger = MetricsLogger(run_dir, enabled=info.is_main)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        logger.truncate_after(start_step)  # lines a killed run wrote after its last checkpoint
        import yaml

        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False,
                                                                  allow_unicode=True))
    flops_per_token = model_cfg.flops_per_token(seq)
    peak, peak_source = peak_flops(info.device, precision)
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if info.is_main:
        print(f"pretraining {model_cfg.num_params() / 1e6:.2f}M params ({model_cfg.num_params(True) / 1e6:.2f}M "
              f"non-embedding), {max_steps} steps x {tokens_per_step:,} tokens, {precision}, "
              f"world {info.world} (dp {info.dp_world}, tp {cfg.parallel.tp}), from step {start_step}")

    val_batch = None
    if cfg.data.val_shards:
        val = PackedDataset(cfg.data.val_shards, seq, seed=0, use_doc_weights=False)
        # no row twice (PackedDataset already refuses a set shorter than one row)
        val_batch = val.batch(list(range(min(cfg.data.val_rows, val.rows_in_epoch(0)))))

    release_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.checkpoint.release_dtype]
    # restored on resume, so a resumed run reports the same numbers as an uninterrupted one
    losses: list[float] = list(state.get("recent_losses", []))
    val_loss = state.get("val_loss")
    last_loss = state.get("loss", float("nan"))
    tail_steps = max(1, max_steps // 10)
    stop_at = min(max_steps, start_step + t.stop_after) if t.stop_after else max_steps
    progress = tqdm(total=max_steps, initial=start_step, disable=not info.is_main, desc="pretrain", unit="step")
    step = start_step
    micro_batches = rows_per_step // info.dp_world // t.micro_batch_size
    while step < stop_at:
        t0 = time.perf_counter()
        rows = step_rows(next_row, rows_per_step, info.dp_rank, info.dp_world)
        batch = dataset.batch(rows)
        valid_local = int((batch["targets"] != -100).sum())
        (valid_global,) = all_reduce_sum([float(valid_local)], info)
        sums = [0.0, 0.0, 0.0]  # ce * n, z * n, non-finite flag
        model.train()
        for m in range(micro_batches):
            sl = slice(m * t.micro_batch_size, (m + 1) * t.micro_batch_size)
            inputs = {k: v[sl].to(info.device) for k, v in batch.items()}
            n = int((inputs["targets"] != -100).sum())
            sync = contextlib.nullcontext()
            if info.distributed and hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(m == micro_batches - 1)
            with sync, autocast:
                out = model(inputs["input_ids"], inputs["targets"], attention_mask=inputs["attention_mask"],
                            return_logits=False)
            scale = n / max(valid_global, 1.0) * info.dp_world  # FSDP averages gradients over dp ranks
            (out.loss * scale).backward()
            if not torch.isfinite(out.loss):
                sums[2] = 1.0
            sums[0] += float(out.ce_loss) * n
            sums[1] += float(out.z_loss) * n
        ce_sum, z_sum, bad = all_reduce_sum(sums, info)
        loss = (ce_sum + model_cfg.z_loss_weight * z_sum) / max(valid_global, 1.0)
        grad_norm = clip_grad_norm(list(model.parameters()), cfg.optim.grad_clip)
        lr = lr_at(step, cfg.optim, max_steps)
        if bad or not math.isfinite(loss) or not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)  # skip: apply nothing from this batch
            bad_streak += 1
            logger.log(step + 1, event="skipped_non_finite", loss=loss, grad_norm=float(grad_norm), lr=lr)
            if info.is_main:
                print(f"step {step + 1}: non-finite loss or gradient, step skipped ({bad_streak} in a row)")
            if bad_streak >= t.max_bad_steps:
                progress.close()
                raise TrainingError(f"{bad_streak} consecutive non-finite steps at step {step + 1}; stopping. "
                                    f"Last good checkpoint: {(ckpt.checkpoint_dirs(run_dir) or ['none'])[-1]}. "
                                    "Lower the LR, check the data, or resume with a different seed.")
        else:
            bad_streak = 0
            set_lr(optimizer, lr)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        next_row += rows_per_step
        tokens_seen += tokens_per_step
        last_loss = loss
        if math.isfinite(loss):
            losses.append(loss)
        dt = time.perf_counter() - t0
        tok_s = tokens_per_step / dt
        mfu = flops_per_token * tok_s / (peak * info.world) if peak == peak else float("nan")
        if step % t.log_every == 0 or step == stop_at:
            logger.log(step, loss=loss, ce_loss=ce_sum / max(valid_global, 1.0),
                       z_loss=z_sum / max(valid_global, 1.0), lr=lr, grad_norm=float(grad_norm), tokens=tokens_seen,
                       tokens_per_s=tok_s, mfu=mfu, step_time=dt)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}" if mfu == mfu else "?")
        if val_batch is not None and ((t.eval_every and step % t.eval_every == 0) or step == max_steps):
            val_loss = evaluate_loss(model, val_batch, t.micro_batch_size, info.device, autocast)
            logger.log(step, val_loss=val_loss)
        every = cfg.checkpoint.release_every_tokens
        if every and tokens_seen // every > (tokens_seen - tokens_per_step) // every:
            ckpt.release_checkpoint(run_dir, model, (tokens_seen // every) * every, step, loss, info.rank,
                                    tokenizer_dir, release_dtype)
        save_due = cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0
        if save_due or step == stop_at:
            ckpt.save_training_state(run_dir, step, model, optimizer,
                                     {"step": step, "tokens": tokens_seen, "loader": LoaderState(next_row).state_dict(),
                                      "bad_streak": bad_streak, "loss": loss, "max_steps": max_steps,
                                      "val_loss": val_loss, "recent_losses": losses[-tail_steps:]},
                                     info.rank, info.distributed, cfg.checkpoint.keep_last)
    progress.close()
    release_dir = None
    if step >= max_steps and cfg.checkpoint.release_final:
        release_dir = ckpt.release_checkpoint(run_dir, model, tokens_seen, step, last_loss, info.rank, tokenizer_dir,
                                              release_dtype, name="final")
    logger.close()
    tail = losses[-tail_steps:] if losses else [float("nan")]
    return PretrainResult(run_dir=str(run_dir), steps=step, tokens=tokens_seen, final_loss=last_loss,
                          smoothed_loss=sum(tail) / len(tail), val_loss=val_loss,
                          release_dir=str(release_dir) if release_dir else None, flops_per_token=flops_per_token,
                          stopped_early=step < max_steps)


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
