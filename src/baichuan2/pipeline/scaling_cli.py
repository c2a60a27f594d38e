"""`baichuan2 scaling plan | run | fit`: a model ladder, L(C) = a*C^b + L_inf, and a checked prediction.

Every rung (and the held-out target) is trained with identical settings except model size (and, with
``tokens_per_param``, the token budget), so the final losses trace one curve.
`run --rung NAME` trains a single rung, so a cluster can run one job per rung against a shared out_dir.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

from baichuan2.pipeline.scaling import (Rung, bootstrap_fits, fit_scaling_law, plan_ladder, plot_scaling_law,
                                       prediction_interval)
from baichuan2.train.engine import FitArgs
from baichuan2.train.optim import OptimArgs
from baichuan2.utils.io import InputError, atomic_write_json, read_json


def ladder_optim(**changes) -> OptimArgs:
    """The ladder's AdamW: peak lr 2e-2 at the narrowest rung (``lr_width_exponent`` scales it for wider
    ones), warm-up over 10% of each rung's steps, then pretraining's cosine decay and clipping."""
    return dataclasses.replace(OptimArgs(lr=2e-2, warmup_frac=0.1), **changes)


def ladder_train(**changes) -> FitArgs:
    """The engine's settings of every rung: 4-row micro-batches, the rest as any run."""
    return dataclasses.replace(FitArgs(micro_batch_size=4), **changes)


# set per rung from its length (logging ~50 times, evaluating at the end): not part of the recipe
_PER_RUNG = ("log_every", "eval_every", "stop_after")


@dataclass
class LadderArgs:
    """The defaults are the CPU demonstration on the pipeline's ~1.9M-token corpus: every model sees
    1.2M tokens, so only models up to ~500k non-embedding parameters are still limited by their size
    (larger ones reach the same loss there; see the README), and the ladder spans 10k-200k to predict
    a 500k target. For real runs, scale presets, target and tokens together.

    Args:
        presets: Model presets of the ladder's rungs (smallest first).
        target: Held-out larger preset whose final loss the fit predicts (trained with the same recipe).
        tokens: Fixed training tokens for every rung and the target (Baichuan 2's protocol: same data
            budget, growing model); 0 switches to tokens_per_param.
        tokens_per_param: Training tokens per non-embedding parameter when tokens is 0.
        min_tokens: Lower bound of any rung's token budget.
        seq_len: Sequence length.
        vocab_size: Vocabulary size (read from the shards' manifest when 0).
        global_batch_tokens: Tokens per optimizer step (same for every rung).
        optim: AdamW and the LR schedule, shared by every verb; optim.lr is the peak LR of the narrowest
            rung, warm-up is best given as optim.warmup_frac (a fraction of each rung's steps).
        lr_width_exponent: Wider rungs get optim.lr * (narrowest hidden / hidden) ** exponent. 0 keeps one
            LR for every rung; 1 is the muP rule for Adam's hidden layers (the optimal LR falls as 1/width).
            With one LR, the wider rungs of a small ladder are over-stepped and the curve bends upwards.
        train: The engine's settings, shared by every verb (micro_batch_size, precision, seed, compile,
            bad-step policy ...); log_every, eval_every and stop_after are set per rung.
        val_shards: Held-out token shards; every rung is scored on the same val_rows rows of them at its
            last step and the fit uses that loss (training-batch loss is too noisy at small scale). Empty:
            fit the smoothed training loss instead.
        val_rows: Rows of val_shards in the fixed evaluation batch (at most one pass over them).
    """

    presets: list[str] = field(default_factory=lambda: ["ladder-10k", "ladder-20k", "ladder-50k", "ladder-100k",
                                                        "ladder-200k"])
    target: str = "ladder-500k"
    tokens: int = 1_200_000
    tokens_per_param: float = 20.0
    min_tokens: int = 65536
    seq_len: int = 256
    vocab_size: int = 0
    global_batch_tokens: int = 1024
    optim: OptimArgs = field(default_factory=ladder_optim)
    lr_width_exponent: float = 1.0
    train: FitArgs = field(default_factory=ladder_train)
    val_shards: str = ""
    val_rows: int = 256


def check_ladder(args: LadderArgs) -> None:
    """Refuse, in one line, settings the ladder derives per rung."""
    defaults = FitArgs()
    fixed = [f"ladder.train.{k}" for k in _PER_RUNG if getattr(args.train, k) != getattr(defaults, k)]
    if fixed:
        raise InputError(f"{', '.join(fixed)}: set per rung by the ladder (logging ~50 times, evaluating at the "
                         "last step); leave unset")


def _vocab(args: LadderArgs, shards: str) -> int:
    if args.vocab_size:
        return args.vocab_size
    from baichuan2.tokenizer.shards import read_manifest

    manifest = read_manifest(shards) or {}
    vocab = manifest.get("tokenizer", {}).get("vocab_size")
    if not vocab:
        raise InputError(f"{shards}: no manifest with the tokenizer's vocab size; pass --ladder.vocab_size")
    return int(vocab)


def plan_rungs(args: LadderArgs, vocab_size: int) -> tuple[list[Rung], Rung]:
    check_ladder(args)
    budget = dict(tokens_per_param=0.0, min_tokens=args.tokens, max_tokens=args.tokens) if args.tokens else \
        dict(tokens_per_param=args.tokens_per_param, min_tokens=args.min_tokens)
    rungs = plan_ladder(args.presets, args.seq_len, vocab_size, **budget)
    target = plan_ladder([args.target], args.seq_len, vocab_size, **budget)[0]
    return rungs, target


def rung_lr(args: LadderArgs, preset: str) -> float:
    """The rung's peak LR: ``optim.lr`` at the narrowest rung, scaled by width ** -lr_width_exponent."""
    from baichuan2.model.config import ModelConfig

    widths = [ModelConfig.from_name(p).hidden_size for p in [*args.presets, args.target]]
    return args.optim.lr * (min(widths) / ModelConfig.from_name(preset).hidden_size) ** args.lr_width_exponent


def rung_config(args: LadderArgs, rung: Rung, shards: str, run_dir: str, evals: int = 1, **checkpoint):
    """The PretrainConfig of one rung: identical across rungs except the model, token budget and (with
    lr_width_exponent) the width-scaled LR. ``evals``: held-out evaluations spread over the run (the
    last one, at the final step, is the loss the fit uses)."""
    from baichuan2.train.trainer import CheckpointArgs, DataArgs, ModelArgs, PretrainConfig, TrainArgs

    steps = max(1, rung.tokens // args.global_batch_tokens)
    engine = {f.name: getattr(args.train, f.name) for f in dataclasses.fields(FitArgs)}
    engine.update(micro_batch_size=args.train.micro_batch_size or max(1, args.global_batch_tokens // args.seq_len),
                  log_every=max(1, steps // 50), eval_every=steps // evals if evals > 1 else 0)
    return PretrainConfig(
        out_dir=run_dir,
        model=ModelArgs(preset=rung.preset, overrides={"vocab_size": rung.overrides["vocab_size"]}),
        data=DataArgs(shards=shards, seq_len=args.seq_len, val_shards=args.val_shards or None,
                      val_rows=args.val_rows),
        optim=dataclasses.replace(args.optim, lr=rung_lr(args, rung.preset)).for_run(steps),
        train=TrainArgs(**engine, global_batch_tokens=args.global_batch_tokens, max_steps=steps),
        checkpoint=CheckpointArgs(**checkpoint) if checkpoint else CheckpointArgs(release_final=False),
    )


def train_rung(args: LadderArgs, rung: Rung, shards: str, run_dir: str | Path, evals: int = 1, **checkpoint) -> dict:
    """Train one rung unless its result.json exists, resuming from its last training checkpoint (so an
    interrupted ladder or pipeline continues where it stopped); returns the result record."""
    from dataclasses import replace

    from baichuan2.train.trainer import pretrain

    run_dir = Path(run_dir)
    result_file = run_dir / "result.json"
    if result_file.exists():
        return read_json(result_file)
    res = pretrain(replace(rung_config(args, rung, shards, str(run_dir), evals, **checkpoint), resume=True))
    record = {"name": rung.name, "preset": rung.preset, "params": rung.params, "tokens": res.tokens,
              "flops": rung.flops * res.tokens / rung.tokens, "lr": rung_lr(args, rung.preset), "final_loss": res.final_loss,
              "smoothed_loss": res.smoothed_loss, "val_loss": res.val_loss, "release_dir": res.release_dir}
    atomic_write_json(result_file, record)
    return record


def fit_loss_key(results: list[dict]) -> str:
    """Held-out loss when every run has one (a fixed batch: far less noisy), else smoothed training loss."""
    return "val_loss" if all(r.get("val_loss") is not None for r in results) else "smoothed_loss"


def fit_results(results: list[dict], target: Rung, out_dir: str | Path, actual: dict | None = None,
                progress: bool = False) -> dict:
    """Fit the rungs' final losses, predict the target, compare, plot."""
    key = fit_loss_key(results + ([actual] if actual else []))
    compute = [r["flops"] for r in results]
    loss = [r[key] for r in results]
    fit = fit_scaling_law(compute, loss)
    predicted = float(fit.predict(target.flops))
    band = bootstrap_fits(fit, compute, loss, progress=progress)
    interval = prediction_interval(fit, compute, loss, target.flops, fits=band)
    summary = {"fit": fit.to_dict(), "rungs": results, "target": asdict(target), "predicted_loss": predicted,
               "prediction_interval_5_95": list(interval), "loss_key": key}
    if actual:
        summary["actual_loss"] = actual[key]
        summary["relative_error"] = abs(predicted - actual[key]) / actual[key]
    out = Path(out_dir)
    plot_scaling_law(out / "scaling_law.png", compute, loss, fit, labels=[r["name"] for r in results],
                     target=(target.name, target.flops), actual=summary.get("actual_loss"), interval=interval,
                     band=band, loss_name="held-out loss" if key == "val_loss" else "training loss (smoothed)")
    atomic_write_json(out / "scaling_fit.json", summary)
    return summary


def plan(shards: str = "", ladder: LadderArgs = LadderArgs()) -> None:
    """Print the ladder: parameters, tokens and training FLOPs of each rung and of the target.

    Args:
        shards: Token shards (their manifest gives the vocabulary size unless ladder.vocab_size is set).
        ladder: The ladder recipe.
    """
    rungs, target = plan_rungs(ladder, _vocab(ladder, shards) if not ladder.vocab_size else ladder.vocab_size)
    print(f"{'rung':<14}{'non-emb params':>16}{'tokens':>14}{'FLOPs':>12}")
    for r in [*rungs, target]:
        tag = " (target)" if r is target else ""
        print(f"{r.name:<14}{r.params:>16,}{r.tokens:>14,}{r.flops:>12.3g}{tag}")


def run(shards: str, out_dir: str = "runs/scaling", ladder: LadderArgs = LadderArgs(), rung: str | None = None,
        include_target: bool = True, checkpoint_every: int = 100) -> None:
    """Train the ladder (finished rungs are skipped, an unfinished one resumes from its last checkpoint,
    so re-running continues), then fit and predict.

    Args:
        shards: Token shards from `baichuan2 tokenizer encode`.
        out_dir: Ladder directory: rungs/<name>/ runs, scaling_fit.json, scaling_law.png.
        ladder: The ladder recipe (presets, target, tokens per parameter, optimizer settings).
        rung: Train only this rung (one job per rung on a cluster); no fit.
        include_target: Also train the held-out target to check the prediction.
        checkpoint_every: Steps between training checkpoints of each rung.
    """
    rungs, target = plan_rungs(ladder, _vocab(ladder, shards))
    by_name = {r.name: r for r in [*rungs, target]}
    if rung:
        if rung not in by_name:
            raise SystemExit(f"scaling run: unknown rung {rung!r} (ladder: {', '.join(by_name)})")
        print(train_rung(ladder, by_name[rung], shards, Path(out_dir) / "rungs" / rung, save_every=checkpoint_every,
                         release_final=False))
        return
    results = [train_rung(ladder, r, shards, Path(out_dir) / "rungs" / r.name, save_every=checkpoint_every,
                          release_final=False) for r in rungs]
    actual = train_rung(ladder, target, shards, Path(out_dir) / "rungs" / target.name, save_every=checkpoint_every,
                        release_final=False) if include_target else None
    _print_summary(fit_results(results, target, out_dir, actual, progress=True))


def fit(out_dir: str = "runs/scaling", shards: str = "", ladder: LadderArgs = LadderArgs()) -> None:
    """Fit L(C) = a*C^b + L_inf to the finished rungs in out_dir and predict the target.

    Args:
        out_dir: Ladder directory written by `baichuan2 scaling run`.
        shards: Token shards (only for the vocabulary size when ladder.vocab_size is 0).
        ladder: The ladder recipe used for the runs.
    """
    rungs, target = plan_rungs(ladder, _vocab(ladder, shards) if not ladder.vocab_size else ladder.vocab_size)
    results = [read_json(p) for r in rungs if (p := Path(out_dir) / "rungs" / r.name / "result.json").exists()]
    if len(results) < 3:
        raise SystemExit(f"scaling fit: need at least 3 finished rungs in {out_dir}/rungs, found {len(results)}")
    target_file = Path(out_dir) / "rungs" / target.name / "result.json"
    _print_summary(fit_results(results, target, out_dir, read_json(target_file) if target_file.exists() else None,
                               progress=True))


def _print_summary(s: dict) -> None:
    f = s["fit"]
    print(f"L(C) = {f['a']:.4g}±{f['a_std']:.2g} * (C/{f['c0']:.3g})^({f['b']:.4f}±{f['b_std']:.3f}) "
          f"+ {f['l_inf']:.4f}±{f['l_inf_std']:.3f}  ({f['n_points']} rungs, rms residual {f['residual_rms']:.4f})")
    lo, hi = s["prediction_interval_5_95"]
    line = f"[{s['loss_key']}] predicted {s['target']['name']} loss: {s['predicted_loss']:.4f} (5-95%: {lo:.4f}-{hi:.4f})"
    if "actual_loss" in s:
        line += f"; actual {s['actual_loss']:.4f}; relative error {100 * s['relative_error']:.2f}%"
    print(line)


COMMANDS = {"plan": plan, "run": run, "fit": fit}
