"""`baichuan2 rm train | eval`: a reward model with the pairwise loss, and its per-category report."""

from __future__ import annotations

from pathlib import Path

import torch

from baichuan2.align.reward import RMArgs, rm_optim
from baichuan2.train.engine import CheckpointArgs, FitArgs
from baichuan2.train.optim import OptimArgs
from baichuan2.train.parallel import ParallelArgs
from baichuan2.utils.io import as_paths, atomic_write_json, atomic_write_text


def _pairs(tok, data: str | list[str], args: RMArgs, limit: int):
    from baichuan2.align.preference import read_pairs
    from baichuan2.align.reward import encode_pairs
    from baichuan2.align.taxonomy import Taxonomy

    pairs = list(read_pairs(as_paths(data)))
    return encode_pairs(tok, pairs[:limit] if limit else pairs, args.max_length, Taxonomy.load(args.taxonomy))


def train(checkpoint: str, data: str | list[str], out_dir: str = "runs/rm", eval_data: str | list[str] | None = None,
          args: RMArgs = RMArgs(), optim: OptimArgs = rm_optim(), train: FitArgs = FitArgs(),
          checkpointing: CheckpointArgs = CheckpointArgs(), parallel: ParallelArgs = ParallelArgs(),
          resume: bool | str = False, limit: int = 0, dtype: str = "float32", device: str = "auto") -> None:
    """Train a reward model (LM trunk + scalar head on the last token) with -log sigmoid(r_chosen - r_rejected).

    Data: preference pairs as hh-rlhf transcripts, ShareGPT/LLaMA-Factory DPO records, {"prompt" |
    "messages", "chosen", "rejected"} or Alpaca DPO, each optionally with "category" ("a/b/c" in the
    prompt taxonomy) and "gap" (annotated preference strength). Unlabelled prompts are categorised with
    the taxonomy's keywords. Held-out accuracy is reported overall, per category level, per gap and per
    margin bucket, before and after training; OUT_DIR is an HF checkpoint + value_head.safetensors.
    Multi-GPU: `torchrun --nproc_per_node N -m baichuan2.cli rm train ...` (FSDP2; rank 0 writes OUT_DIR).

    Args:
        checkpoint: Base model (usually the SFT model), HF layout with tokenizer.
        data: Preference files (JSON or JSONL, also .gz).
        out_dir: Output reward-model directory (OUT_DIR-logs/ holds metrics and the report).
        eval_data: Held-out preference files (default: args.val_fraction of data).
        args: Data and loss settings (--args.lora.r 8 for LoRA on the trunk).
        optim: AdamW and LR schedule (shared by every training verb).
        train: The training loop: micro-batch, precision, compile, bad-step policy (shared by every verb).
        checkpointing: Training-state checkpoints in OUT_DIR-logs/checkpoints (save_every, keep_last).
        parallel: Tensor-parallel degree under torchrun (FSDP2 takes the remaining ranks).
        resume: true for the latest checkpoint in OUT_DIR-logs, or a checkpoint directory.
        limit: Use only the first N pairs of data (0 = all).
        dtype: Training dtype of the weights.
        device: auto | cpu | cuda | cuda:N.
    """
    from baichuan2.align.reward import RewardModel, format_report, train_reward_model
    from baichuan2.align.sft import split_holdout
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.tokenizer import Tokenizer
    from baichuan2.train.engine import TrainingError

    tok = Tokenizer.from_pretrained(checkpoint)
    lm = load_pretrained(checkpoint, dtype=dtype, device="cpu" if device == "auto" else device)  # fit places it
    train.device = device
    args.max_length = min(args.max_length, lm.config.max_position_embeddings)
    pairs = _pairs(tok, data, args, limit)
    if eval_data:
        train_pairs, val = pairs, _pairs(tok, eval_data, args, 0)
    else:
        train_pairs, val = split_holdout(pairs, args.val_fraction, args.seed)
    try:
        torch.manual_seed(train.seed)  # the head's initial weights: the same on every rank under torchrun
        res = train_reward_model(RewardModel(lm), tok, train_pairs, val, out_dir, args, optim=optim, fit_args=train,
                                 checkpoint=checkpointing, parallel=parallel, resume=resume)
    except TrainingError as e:
        raise SystemExit(f"rm: {e}") from None
    if res.get("worker"):
        return
    if "val_after" not in res:
        print(f"rm: stopped after step {res['steps']}; resume with --resume true")
        return
    print(f"rm: {res['steps']} steps on {res['train_pairs']} pairs in {res['seconds']} s; saved {out_dir}")
    if res["val_after"]:
        print(f"held-out accuracy {res['val_before']['accuracy']:.2f}% -> {res['val_after']['accuracy']:.2f}%")
        report = format_report(res["val_after"])
        atomic_write_text(Path(out_dir).parent / f"{Path(out_dir).name}-logs" / "report.md", report + "\n")
        print(report)


def evaluate(reward_model: str, data: str | list[str], out_dir: str = "runs/rm-eval", max_length: int = 512,
         taxonomy: str = RMArgs.taxonomy, limit: int = 0, batch_size: int = 16, device: str = "auto") -> None:
    """Pairwise accuracy of a trained reward model: overall, per category, per gap and margin bucket.

    Args:
        reward_model: Directory written by `baichuan2 rm train`.
        data: Preference files.
        out_dir: Writes report.json and report.md here.
        max_length: Tokens per sequence (left-truncated).
        taxonomy: Prompt taxonomy YAML for unlabelled prompts.
        limit: Only the first N pairs (0 = all).
        batch_size: Sequences per forward pass.
        device: auto | cpu | cuda | cuda:N.
    """
    from baichuan2.align.reward import RewardModel, evaluate_reward_model, format_report
    from baichuan2.tokenizer import Tokenizer

    rm = RewardModel.load(reward_model, device=device)
    tok = Tokenizer.from_pretrained(reward_model)
    args = RMArgs(max_length=min(max_length, rm.config.max_position_embeddings), taxonomy=taxonomy)
    report = evaluate_reward_model(rm, _pairs(tok, data, args, limit), batch_size)
    out = Path(out_dir)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", format_report(report) + "\n")
    print(format_report(report))


COMMANDS = {"train": train, "eval": evaluate}
