"""`baichuan2 dpo`: direct preference optimisation on preference pairs (Baichuan 2's safety stage)."""

from __future__ import annotations

from baichuan2.align.dpo import DPOArgs, dpo_optim
from baichuan2.train.engine import CheckpointArgs, FitArgs
from baichuan2.train.optim import OptimArgs
from baichuan2.train.parallel import ParallelArgs
from baichuan2.utils.io import as_paths


def run(checkpoint: str, data: str | list[str], out_dir: str = "runs/dpo", eval_data: str | list[str] | None = None,
        args: DPOArgs = DPOArgs(), optim: OptimArgs = dpo_optim(), train: FitArgs = FitArgs(),
        checkpointing: CheckpointArgs = CheckpointArgs(), parallel: ParallelArgs = ParallelArgs(),
        resume: bool | str = False, limit: int = 0, dtype: str = "float32", device: str = "auto") -> None:
    """DPO-train CHECKPOINT (usually the SFT model) on preference pairs; the starting model is the reference.

    Data: the layouts `rm` reads (hh-rlhf transcripts, ShareGPT/LLaMA-Factory DPO, {"prompt" | "messages",
    "chosen", "rejected"}, Alpaca DPO). Loss: sigmoid DPO with beta (default 0.1), optional label
    smoothing (conservative DPO), or IPO. Reference log-probs are computed once and cached in
    OUT_DIR-logs/ (--args.reference model keeps a frozen copy instead). Writes OUT_DIR (HF layout, chat
    defaults; LoRA merged) and OUT_DIR-logs/ with metrics.jsonl (loss, rewards/chosen, rewards/rejected,
    margin, accuracy, kl_proxy), TensorBoard scalars, checkpoints and dpo_result.json (held-out implicit-
    reward accuracy before and after). Multi-GPU: `torchrun --nproc_per_node N -m baichuan2.cli dpo ...`.

    Args:
        checkpoint: Policy and reference model directory (HF layout with tokenizer).
        data: Preference files (JSON or JSONL, also .gz).
        out_dir: Output checkpoint directory.
        eval_data: Held-out preference files (default: args.val_fraction of data).
        args: DPO settings (beta, label_smoothing, loss_type, reference, LoRA).
        optim: AdamW and LR schedule (shared by every training verb).
        train: The training loop: micro-batch, precision, compile, bad-step policy (shared by every verb).
        checkpointing: Training-state checkpoints in OUT_DIR-logs/checkpoints (save_every, keep_last).
        parallel: Tensor-parallel degree under torchrun (FSDP2 takes the remaining ranks).
        resume: true for the latest checkpoint in OUT_DIR-logs, or a checkpoint directory.
        limit: Use only the first N pairs of data (0 = all).
        dtype: Dtype of the loaded weights.
        device: auto | cpu | cuda | cuda:N.
    """
    from baichuan2.align.dpo import dpo
    from baichuan2.align.preference import read_pairs
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.tokenizer import Tokenizer
    from baichuan2.train.engine import TrainingError
    from baichuan2.utils.io import InputError

    tok = Tokenizer.from_pretrained(checkpoint)
    model = load_pretrained(checkpoint, dtype=dtype, device="cpu" if device == "auto" else device)
    train.device = device
    try:
        pairs = list(read_pairs(as_paths(data)))
        pairs = pairs[:limit] if limit else pairs
        val = list(read_pairs(as_paths(eval_data))) if eval_data else None
        res = dpo(model, tok, pairs, out_dir, args, optim=optim, fit_args=train, checkpoint=checkpointing,
                  parallel=parallel, resume=resume, val_pairs=val)
    except (TrainingError, InputError) as e:
        raise SystemExit(f"dpo: {e}") from None
    if res.get("worker"):
        return
    if "val_after" not in res:
        print(f"dpo: stopped after step {res['steps']}; resume with --resume true")
        return
    print(f"dpo: {res['steps']} steps on {res['train_pairs']} pairs in {res['seconds']} s; saved {out_dir}")
    if res["val_after"]:
        b, a = res["val_before"], res["val_after"]
        print(f"held-out implicit-reward accuracy {100 * b['val_accuracy']:.2f}% -> {100 * a['val_accuracy']:.2f}% "
              f"(margin {a['val_margin']:+.4f}, KL proxy {a['val_kl_proxy']:.4f})")


COMMANDS = run
