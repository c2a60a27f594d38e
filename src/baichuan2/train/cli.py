"""`baichuan2 pretrain`: every field of the recipe is a flag (``--optim.lr 3e-4``)."""

from __future__ import annotations

from baichuan2.train.optim import OptimArgs
from baichuan2.train.parallel import ParallelArgs
from baichuan2.train.trainer import (CheckpointArgs, DataArgs, ModelArgs, PretrainConfig, TrainArgs,
                                     TrainingError, pretrain)


def pretrain_cli(out_dir: str = "runs/pretrain", model: ModelArgs = ModelArgs(), data: DataArgs = DataArgs(),
                 optim: OptimArgs = OptimArgs(), train: TrainArgs = TrainArgs(),
                 checkpoint: CheckpointArgs = CheckpointArgs(), parallel: ParallelArgs = ParallelArgs(),
                 resume: bool | str = False) -> None:
    """Pretrain a Baichuan 2 model on token shards (AdamW 0.9/0.95, wd 0.1, clip 0.5, warm-up + cosine, bf16).

    Recipes: `--config src/baichuan2/recipes/pretrain-tiny.yaml` (CPU minutes), `pretrain-7b.yaml`,
    `pretrain-13b.yaml` (the paper's settings). Multi-GPU / multi-node: launch the same command with
    `torchrun --nproc_per_node N -m baichuan2.cli pretrain ...`; `--parallel.tp K` adds tensor parallelism
    inside groups of K ranks, the rest is FSDP2 (ZeRO-3). `--resume true` continues bit-exactly from the
    latest checkpoint in out_dir (also on a different number of processes).

    Args:
        out_dir: run directory: metrics.jsonl, tb/, checkpoints/, release/, config.yaml.
        model: model preset, overrides and optional initial checkpoint.
        data: token shards, sequence length, sampling weights, validation shards.
        optim: AdamW and LR schedule (peak LR, warm-up steps, min LR ratio, weight decay, clipping).
        train: batch size in tokens, micro-batch, steps/tokens, precision, compile, logging.
        checkpoint: training-state checkpoints and released HF checkpoints on a token schedule.
        parallel: tensor-parallel degree (FSDP2 takes the remaining ranks).
        resume: true for the latest checkpoint in out_dir, or a checkpoint directory.
    """
    cfg = PretrainConfig(out_dir=out_dir, model=model, data=data, optim=optim, train=train, checkpoint=checkpoint,
                         parallel=parallel, resume=resume)
    try:
        result = pretrain(cfg)
    except TrainingError as e:
        raise SystemExit(f"pretrain: {e}") from None
    print(f"done: {result.steps} steps, {result.tokens:,} tokens, final loss {result.final_loss:.4f} "
          f"(smoothed {result.smoothed_loss:.4f})" + (f", released {result.release_dir}" if result.release_dir else ""))


COMMANDS = pretrain_cli
