"""`baichuan2 sft`: supervised fine-tuning of a checkpoint on chat data (full or LoRA)."""

from __future__ import annotations

from baichuan2.align.sft import SFTArgs, read_conversations, sft, sft_optim
from baichuan2.train.engine import CheckpointArgs, FitArgs
from baichuan2.train.optim import OptimArgs
from baichuan2.train.parallel import ParallelArgs
from baichuan2.utils.io import as_paths


def run(checkpoint: str, data: str | list[str], out_dir: str = "runs/sft", args: SFTArgs = SFTArgs(),
        optim: OptimArgs = sft_optim(), train: FitArgs = FitArgs(), checkpointing: CheckpointArgs = CheckpointArgs(),
        parallel: ParallelArgs = ParallelArgs(), resume: bool | str = False, dtype: str = "float32",
        device: str = "auto") -> None:
    """Fine-tune CHECKPOINT on conversations with loss on the assistant's tokens only (Baichuan 2 chat format).

    Data: JSON or JSONL with {"messages": [{"role", "content"}]}, ShareGPT {"conversations": [{"from",
    "value"}]} or Alpaca {"instruction", "input", "output"} records. Writes an HF-layout checkpoint with
    the tokenizer and Baichuan 2-Chat generation defaults to OUT_DIR (LoRA adapters are merged), and
    OUT_DIR-logs/ with metrics.jsonl, TensorBoard scalars, training checkpoints and sft_result.json
    (held-out assistant loss before and after). Multi-GPU: `torchrun --nproc_per_node N -m baichuan2.cli
    sft ...` (FSDP2; --parallel.tp K adds tensor parallelism).

    Args:
        checkpoint: Base model directory (HF layout with tokenizer).
        data: Conversation files.
        out_dir: Output checkpoint directory.
        args: Data and schedule settings (--args.lora.r 8 for LoRA).
        optim: AdamW and LR schedule (shared by every training verb).
        train: The training loop: micro-batch, precision, compile, bad-step policy (shared by every verb).
        checkpointing: Training-state checkpoints in OUT_DIR-logs/checkpoints (save_every, keep_last).
        parallel: Tensor-parallel degree under torchrun (FSDP2 takes the remaining ranks).
        resume: true for the latest checkpoint in OUT_DIR-logs, or a checkpoint directory.
        dtype: Dtype of the loaded weights (float32 keeps fp32 master weights; bf16 autocast is train.precision).
        device: auto | cpu | cuda | cuda:N.
    """
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.tokenizer import Tokenizer
    from baichuan2.train.engine import TrainingError

    model = load_pretrained(checkpoint, dtype=dtype, device="cpu" if device == "auto" else device)
    tok = Tokenizer.from_pretrained(checkpoint)
    train.device = device
    try:
        m = sft(model, tok, list(read_conversations(as_paths(data))), out_dir, args, optim=optim, fit_args=train,
                checkpoint=checkpointing, parallel=parallel, resume=resume)
    except TrainingError as e:
        raise SystemExit(f"sft: {e}") from None
    if "val_loss_before" in m:
        before, after = m["val_loss_before"], m["val_loss_after"]
        held = f"held-out assistant loss {before:.4f} -> {after:.4f}; " if before is not None else ""
        print(f"sft: {m['steps']} steps on {m['train_conversations']} conversations in {m['seconds']} s; "
              f"{held}saved {out_dir}")
    elif m.get("stopped_early"):
        print(f"sft: stopped after step {m['steps']} (train.stop_after); resume with --resume true")


COMMANDS = run
