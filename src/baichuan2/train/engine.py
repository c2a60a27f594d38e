"""One training engine for every objective: ``fit(model, objective, run_dir, ...)``.

The engine owns, once, what every training run needs: the optimiser (``build_optimizer``: AdamW with
decay/no-decay groups), the warm-up + cosine LR from the step, bf16 autocast with fp32 master weights,
gradient accumulation over micro-batches weighted by each micro-batch's share of the *global* count
(target tokens for language modelling, pairs for preferences: the loss is the same mean whatever the
micro-batching or world size), ``parallelize`` (FSDP2 / TP under torchrun, activation checkpointing,
compile), global grad-norm clipping, one bad-step policy, JSONL + TensorBoard metrics with a progress
bar, periodic held-out evaluation and DCP checkpoints with exact resume.

An *objective* is small (see ``Objective``): it supplies this rank's micro-batches for a step, the loss
of one micro-batch with the count it is a mean over, its held-out evaluation and what it saves.

Bad steps.  A step is bad when its loss or gradient norm is not finite, or when it *diverges*: the loss
or the gradient norm jumps far above the running statistics of the recent healthy steps
(``DivergenceArgs``).  A bad step applies nothing; ``max_bad_steps`` in a row stop the run.  While a
streak is running nothing is saved, and a checkpoint only counts as good once the step *after* it (the
first to use its weights) was healthy: the stop message names that checkpoint, and the checkpoints
written after it are renamed ``*.diverged`` so ``--resume true`` cannot pick them.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from baichuan2.train.optim import OptimArgs, build_optimizer, lr_at, set_lr
from baichuan2.train.parallel import DistInfo, ParallelArgs, all_reduce_sum, clip_grad_norm
from baichuan2.utils.validate import require_ints


class TrainingError(RuntimeError):
    pass


# With compile left to "auto", runs this long are compiled.  On a 2-core AVX512-BF16 CPU, bf16 under compile
# runs a 22.6M-parameter model at ~2,200 tok/s vs 860-1,700 eager (benchmarks/model_throughput.py), i.e.
# ~0.3-1.4 s saved per 2,048-token step, against a one-off compile of roughly a minute (and a second one when
# variable-length SFT/DPO batches make the shapes dynamic): a few hundred steps to break even.
COMPILE_MIN_STEPS = 300


def use_compile(compile_: bool | None, max_steps: int, device: torch.device) -> bool:
    """``compile_`` as given, or (None) whether compiling pays back over a run of ``max_steps``."""
    if compile_ is not None:
        return bool(compile_)
    if device.type == "cpu" and not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
        return False  # Inductor's CPU backend builds C++ kernels
    return max_steps >= COMPILE_MIN_STEPS


@dataclass
class DivergenceArgs:
    """When a finite step still counts as bad (a blow-up in progress).

    Args:
        loss_sigmas: Bad when loss > mean + loss_sigmas * std of the last ``window`` healthy losses and
            also > loss_ratio x their mean (0 = off).
        loss_ratio: See loss_sigmas (keeps a near-constant loss from tripping on a tiny std).
        grad_ratio: Bad when the gradient norm (before clipping) > grad_ratio x the median of the last
            ``window`` healthy norms (0 = off).
        window: Healthy steps the running statistics cover.
        min_history: Healthy steps before the rules apply (early training moves fast).
    """

    loss_sigmas: float = 6.0
    loss_ratio: float = 1.5
    grad_ratio: float = 50.0
    window: int = 50
    min_history: int = 10


@dataclass
class FitArgs:
    """Args:
        micro_batch_size: Rows (or pairs) per forward pass on each rank (0 = the rank's whole batch).
        stop_after: Stop (and checkpoint) after this many steps in this session (0 = run to the end).
        precision: auto (bf16 where the hardware has it natively) | bf16 | fp32.
        compile: torch.compile each decoder layer (null = auto: when the run has at least
            ``COMPILE_MIN_STEPS`` steps, so the one-off compile time pays back, and a C compiler exists).
        activation_checkpointing: Recompute decoder layers in the backward pass.
        log_every: Steps between metric lines.
        eval_every: Steps between held-out evaluations (0 = only at the end).
        max_bad_steps: Consecutive bad (non-finite or diverging) steps before the run stops.
        divergence: When a finite step counts as bad.
        device: auto | cpu | cuda.
        seed: Initialisation, shuffling and sampling seed.
        threads: torch CPU threads (0 = default).
    """

    micro_batch_size: int = 0
    stop_after: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool | None = None
    activation_checkpointing: bool = False
    log_every: int = 1
    eval_every: int = 0
    max_bad_steps: int = 5
    divergence: DivergenceArgs = field(default_factory=DivergenceArgs)
    device: str = "auto"
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        require_ints(self, "train", "log_every", "max_bad_steps")
        require_ints(self, "train", "micro_batch_size", "stop_after", "eval_every", "threads", minimum=0)


@dataclass
class CheckpointArgs:
    save_every: int = 0  # steps between training-state checkpoints (0 = only at the end)
    keep_last: int = 2
    release_every_tokens: int = 0  # pretraining: release a HF checkpoint each time this many more tokens are seen
    release_final: bool = True
    release_dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    def __post_init__(self) -> None:
        require_ints(self, "checkpoint", "save_every", "keep_last", "release_every_tokens", minimum=0)


class Objective:
    """What a training run optimises; the engine calls these (all but ``loss`` have defaults)."""

    name = "train"

    def setup(self, model, info: DistInfo) -> None:
        """Called once the model is parallelised (shard the data by ``info.dp_rank`` here)."""

    def total_steps(self) -> int:
        raise NotImplementedError

    def micro_batches(self, step: int, micro_batch_size: int) -> list[dict]:
        """This rank's micro-batches of optimiser step ``step`` (0-based); a pure function of ``step``."""
        raise NotImplementedError

    def count(self, micro: dict) -> float:
        """What the micro-batch's loss is a mean over (target tokens, pairs)."""
        return float(micro["count"])

    def tokens(self, micro: dict) -> int:
        """Tokens the micro-batch runs through the model (throughput, MFU)."""
        mask = micro.get("attention_mask")
        return int((mask != 0).sum()) if mask is not None else int(micro["input_ids"].numel())

    def loss(self, model, micro: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """``(mean loss over count(micro), {metric: mean over count(micro)})``."""
        raise NotImplementedError

    def summarize(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """Step metrics from the count-weighted sums of ``loss``'s metrics; must contain ``loss``."""
        return {k: v / max(count, 1.0) for k, v in sums.items()}

    def evaluate(self, model, autocast) -> dict[str, float]:
        return {}

    def after_step(self, model, step: int, metrics: dict, info: DistInfo) -> None:
        """Hook after a step was logged (pretraining releases checkpoints on a token schedule here)."""

    def state_dict(self, step: int) -> dict:
        return {}

    def flops_per_token(self, model) -> float:
        cfg = getattr(model, "config", None)
        return float(cfg.flops_per_token(getattr(self, "seq_len", 512))) if hasattr(cfg, "flops_per_token") else \
            float("nan")


def epoch_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Item indices of every optimizer step: a seeded shuffle per epoch, cut into batches (the last may be short)."""
    import random

    rng, out = random.Random(seed + 1), []
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        out += [order[k: k + batch_size] for k in range(0, n, batch_size)]
    return out


def rank_share(items: list, micro_batch_size: int, info: DistInfo) -> list[tuple[list, bool]]:
    """This data-parallel rank's items of a global batch, cut into micro-batches: ``[(items, real)]``.

    Every rank runs the same number of micro-batches (FSDP all-gathers in every forward, so a rank with one
    micro-batch fewer would leave the others waiting): a rank short of items (a short last batch) fills up
    with the first item marked ``real=False``, which the objective weights by zero."""
    mine = items[info.dp_rank::info.dp_world]
    per_rank = -(-len(items) // info.dp_world)
    size = micro_batch_size or per_rank
    out = []
    for k in range(-(-per_rank // size)):
        part = mine[k * size: (k + 1) * size]
        out.append((part, True) if part else (items[:1], False))
    return out


class EpochObjective(Objective):
    """An objective over a list of examples (conversations, pairs): seeded shuffles per epoch, ``batch_size``
    examples a step shared out over the data-parallel ranks; subclasses turn examples into a micro-batch."""

    def __init__(self, items: list, batch_size: int, epochs: int, seed: int):
        self.items = list(items)
        self.batches = epoch_batches(len(self.items), batch_size, epochs, seed)
        self.info = DistInfo()

    def setup(self, model, info: DistInfo) -> None:
        self.info = info

    def total_steps(self) -> int:
        return len(self.batches)

    def make_micro(self, examples: list, real: bool) -> dict:
        """One micro-batch of ``examples``; ``count`` 0 when not ``real`` (a padding rank)."""
        raise NotImplementedError

    def micro_batches(self, step: int, micro_batch_size: int) -> list[dict]:
        return [self.make_micro([self.items[i] for i in idx], real)
                for idx, real in rank_share(self.batches[step], micro_batch_size, self.info)]


@dataclass
class FitResult:
    steps: int
    max_steps: int
    losses: list[float]  # finite training losses in order
    last_loss: float
    last_metrics: dict[str, Any]
    evals: dict[str, float]
    tokens: int
    stopped_early: bool
    model: Any
    tokens_per_s: float = float("nan")  # this session's tokens / its step time (compile time included)
    mfu: float = float("nan")  # of the measured (CPU) or datasheet (GPU) peak at the run's precision


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


def autocast_for(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class BadStepGuard:
    """The one bad-step policy: non-finite or diverging steps are skipped, ``max_bad`` in a row stop."""

    def __init__(self, args: DivergenceArgs, max_bad: int, streak: int = 0, history: dict | None = None):
        self.args, self.max_bad, self.streak = args, max_bad, streak
        history = history or {}
        self.losses = deque(history.get("losses", []), maxlen=max(1, args.window))
        self.norms = deque(history.get("norms", []), maxlen=max(1, args.window))

    def verdict(self, loss: float, grad_norm: float, non_finite: bool = False) -> str | None:
        """``None`` for a healthy step, else why it is bad."""
        if non_finite or not math.isfinite(loss) or not math.isfinite(grad_norm):
            return "non-finite loss or gradient"
        a = self.args
        if len(self.losses) >= max(2, a.min_history):
            mean, std = statistics.fmean(self.losses), statistics.pstdev(self.losses)
            if a.loss_sigmas and loss > mean + a.loss_sigmas * std and loss > a.loss_ratio * mean:
                return f"loss {loss:.4g} diverges from its running mean {mean:.4g} (std {std:.3g})"
            median = statistics.median(self.norms)
            if a.grad_ratio and grad_norm > a.grad_ratio * max(median, 1e-12):
                return f"gradient norm {grad_norm:.4g} diverges from its running median {median:.4g}"
        return None

    def record(self, loss: float, grad_norm: float, bad: bool) -> None:
        if bad:
            self.streak += 1
        else:
            self.streak = 0
            self.losses.append(loss)
            self.norms.append(grad_norm)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "norms": list(self.norms)}


class OptimizerStep:
    """Clip, set the LR for the step, step AdamW — or skip when the guard says the step is bad.
    Shared by ``fit`` and PPO's actor/critic updates."""

    def __init__(self, model: torch.nn.Module, optim: OptimArgs, max_steps: int):
        self.model, self.optim, self.max_steps = model, optim.for_run(max_steps), max_steps
        self.optimizer = build_optimizer(model, optim)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def lr(self, step: int) -> float:
        return lr_at(step, self.optim, self.max_steps)

    def clip(self) -> float:
        return float(clip_grad_norm(self.params, self.optim.grad_clip))

    def apply(self, step: int) -> None:
        set_lr(self.optimizer, self.lr(step))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # apply nothing from this batch


def params_finite(model: torch.nn.Module, info: DistInfo) -> bool:
    from torch.distributed.tensor import DTensor

    bad = 0.0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        if not bool(torch.isfinite(local.detach()).all()):
            bad = 1.0
            break
    (bad,) = all_reduce_sum([bad], info)
    return bad == 0.0


def _prune(run_dir: Path, keep_last: int, rank: int) -> None:
    from baichuan2.train import checkpoint as ckpt

    if rank == 0 and keep_last > 0:
        for old in ckpt.checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def _quarantine_after(run_dir: Path, last_good_step: int, rank: int) -> Path | None:
    """Rename checkpoints newer than ``last_good_step`` to ``*.diverged``; return the good one (or None)."""
    import re

    from baichuan2.train import checkpoint as ckpt

    good = None
    for d in ckpt.checkpoint_dirs(run_dir):
        step = int(re.match(r"step-(\d+)", d.name).group(1))
        if step <= last_good_step:
            good = d
        elif rank == 0:
            d.rename(d.with_name(d.name + ".diverged"))
    return good


def fit(model: torch.nn.Module, objective: Objective, run_dir: str | Path, optim: OptimArgs = OptimArgs(),
        train: FitArgs = FitArgs(), checkpoint: CheckpointArgs = CheckpointArgs(),
        parallel: ParallelArgs = ParallelArgs(), resume: bool | str = False, info: DistInfo | None = None,
        progress: bool = True, banner: str = "") -> FitResult:
    """Train ``model`` on ``objective``; returns the (possibly parallelised) model with the run's record."""
    from tqdm import tqdm

    from baichuan2.train import checkpoint as ckpt
    from baichuan2.train.mfu import peak_flops
    from baichuan2.train.parallel import init_distributed, parallelize, trunk
    from baichuan2.utils.metrics import MetricsLogger

    if train.threads:
        torch.set_num_threads(train.threads)
    info = info or init_distributed(parallel.tp, train.device)
    run_dir = Path(run_dir)
    precision = resolve_precision(train.precision, info.device)
    max_steps = objective.total_steps()
    if max_steps <= 0:
        raise TrainingError("nothing to train: the objective has no steps")
    model = model.to(info.device)
    flops_per_token = objective.flops_per_token(model)
    if train.activation_checkpointing:
        trunk(model).gradient_checkpointing = True
    model = parallelize(model, info, parallel)
    if use_compile(train.compile, max_steps, info.device):
        for layer in _decoder_layers(model):
            layer.compile()
    objective.setup(model, info)
    stepper = OptimizerStep(model, optim, max_steps)

    start_step, bad_streak, history, tokens_seen, state = 0, 0, {}, 0, {}
    if resume:
        resume_from = Path(resume) if isinstance(resume, str) else (ckpt.checkpoint_dirs(run_dir) or [None])[-1]
        if resume_from is None:
            if info.is_main:
                print(f"no checkpoint in {run_dir}/checkpoints; starting from scratch")
        else:
            state = ckpt.load_training_state(resume_from, model, stepper.optimizer, info.rank)
            start_step, bad_streak = state["step"], state.get("bad_streak", 0)
            history, tokens_seen = state.get("divergence", {}), state.get("tokens", 0)
    guard = BadStepGuard(train.divergence, train.max_bad_steps, bad_streak, history)
    logger = MetricsLogger(run_dir, enabled=info.is_main)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        logger.truncate_after(start_step)  # lines a killed run wrote after its last checkpoint
    peak, _ = peak_flops(info.device, precision)
    peak_refreshed = False
    autocast = autocast_for(precision, info.device)
    if info.is_main and banner:
        print(f"{banner}, {max_steps} steps, {precision}, world {info.world} (dp {info.dp_world}, "
              f"tp {parallel.tp}), from step {start_step}")

    # restored on resume (the last 10% of the losses, the latest evaluation), so a resumed run reports the
    # same numbers as an uninterrupted one
    tail_steps = max(1, max_steps // 10)
    losses: list[float] = list(state.get("recent_losses", []))
    evals: dict[str, float] = dict(state.get("evals", {}))
    last_loss, metrics = state.get("loss", float("nan")), {}
    pending_good: int | None = None  # a checkpoint not yet confirmed by a healthy next step
    last_good = max((int(d.name.split("-")[1]) for d in ckpt.checkpoint_dirs(run_dir)), default=None) \
        if start_step else None
    stop_at = min(max_steps, start_step + train.stop_after) if train.stop_after else max_steps
    bar = tqdm(total=max_steps, initial=start_step, disable=not (info.is_main and progress), desc=objective.name,
               unit="step")
    step = start_step
    session_tokens, session_time = 0, 0.0
    while step < stop_at:
        t0 = time.perf_counter()
        micros = objective.micro_batches(step, train.micro_batch_size)
        counts = [objective.count(m) for m in micros]
        (count_global,) = all_reduce_sum([float(sum(counts))], info)
        sums: dict[str, float] = {}
        non_finite = 0.0
        tokens_local = 0
        model.train()
        for k, (micro, n) in enumerate(zip(micros, counts, strict=True)):
            if info.distributed and hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(k == len(micros) - 1)
            with autocast:
                loss, stats = objective.loss(model, micro)
            scale = n / max(count_global, 1.0) * info.dp_world  # FSDP averages gradients over dp ranks
            (loss * scale).backward()
            if not torch.isfinite(loss):
                non_finite = 1.0
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + float(value) * n
            tokens_local += objective.tokens(micro)
        keys = sorted(sums)
        reduced = all_reduce_sum([sums[k] for k in keys] + [non_finite, float(tokens_local)], info)
        sums = dict(zip(keys, reduced[:-2], strict=True))
        non_finite, step_tokens = reduced[-2], int(reduced[-1])
        metrics = objective.summarize(sums, count_global)
        loss_value = metrics["loss"]
        grad_norm = stepper.clip()
        lr = stepper.lr(step)
        why = guard.verdict(loss_value, grad_norm, bool(non_finite))
        if why:
            stepper.skip()
            event = "skipped_non_finite" if "non-finite" in why else "skipped_divergence"
            logger.log(step + 1, event=event, loss=loss_value, grad_norm=grad_norm, lr=lr, reason=why)
            if info.is_main:
                print(f"step {step + 1}: {why}; step skipped ({guard.streak + 1} in a row)")
        else:
            stepper.apply(step)
            if pending_good is not None:  # the weights it holds gave a healthy loss: confirmed
                last_good, pending_good = pending_good, None
                _prune(run_dir, checkpoint.keep_last, info.rank)
        guard.record(loss_value, grad_norm, bool(why))
        if why and guard.streak >= train.max_bad_steps:
            bar.close()
            logger.close()
            # the weights of the step before the streak began produced its bad loss: only earlier ones are good
            first_bad = step + 1 - guard.streak + 1
            good = _quarantine_after(run_dir, min(first_bad - 2, last_good if last_good is not None else -1),
                                     info.rank)
            kind = "non-finite" if "non-finite" in why else "bad (non-finite or diverging)"
            raise TrainingError(f"{guard.streak} consecutive {kind} steps at step {step + 1}; stopping. "
                                f"Last good checkpoint: {good or 'none'}. "
                                "Lower the LR, check the data, or resume with a different seed.")
        step += 1
        tokens_seen += step_tokens
        last_loss = loss_value
        if math.isfinite(loss_value):
            losses.append(loss_value)
        dt = time.perf_counter() - t0
        session_tokens, session_time = session_tokens + step_tokens, session_time + dt
        tok_s = step_tokens / dt
        mfu = flops_per_token * tok_s / (peak * info.world) if peak == peak else float("nan")
        if mfu > 1.0 and info.device.type == "cpu" and not peak_refreshed:  # cached peak measured under load
            peak_refreshed = True
            peak = max(peak, peak_flops(info.device, precision, refresh=True)[0])
            mfu = flops_per_token * tok_s / (peak * info.world)
        metrics = {**metrics, "lr": lr, "grad_norm": grad_norm}
        if step % train.log_every == 0 or step == stop_at:
            logger.log(step, **objective_log(metrics, tokens_seen, tok_s, mfu, dt))
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}" if mfu == mfu else "?")
        if (train.eval_every and step % train.eval_every == 0) or step == max_steps:
            result = objective.evaluate(model, autocast)
            if result:
                evals = result
                logger.log(step, **result)
        objective.after_step(model, step, {**metrics, "tokens": tokens_seen}, info)
        save_due = checkpoint.save_every and step % checkpoint.save_every == 0
        if (save_due or step == stop_at) and guard.streak == 0 and params_finite(model, info):
            ckpt.save_training_state(run_dir, step, model, stepper.optimizer,
                                     {"step": step, "tokens": tokens_seen, **objective.state_dict(step),
                                      "bad_streak": guard.streak, "loss": loss_value, "max_steps": max_steps,
                                      "divergence": guard.state_dict(), "recent_losses": losses[-tail_steps:],
                                      "evals": evals},
                                     info.rank, info.distributed, keep_last=0)
            pending_good = step
            if step == stop_at:
                _prune(run_dir, checkpoint.keep_last, info.rank)
    bar.close()
    logger.close()
    run_tok_s = session_tokens / session_time if session_time else float("nan")
    return FitResult(steps=step, max_steps=max_steps, losses=losses, last_loss=last_loss, last_metrics=metrics,
                     evals=evals, tokens=tokens_seen, stopped_early=step < max_steps, model=model,
                     tokens_per_s=run_tok_s, mfu=flops_per_token * run_tok_s / (peak * info.world))


def objective_log(metrics: dict, tokens: int, tok_s: float, mfu: float, dt: float) -> dict:
    return {**metrics, "tokens": tokens, "tokens_per_s": tok_s, "mfu": mfu, "step_time": dt}


def _decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a Baichuan model, a reward model (``.lm``) or a peft wrapper."""
    for m in model.modules():
        layers = getattr(getattr(m, "model", None), "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    return []
