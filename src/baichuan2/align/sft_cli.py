"""`baichuan2 sft`: supervised fine-tuning of a checkpoint on chat data (full or LoRA)."""

from __future__ import annotations

from baichuan2.align.sft import SFTArgs, read_conversations, sft
from baichuan2.utils.io import as_paths


def run(checkpoint: str, data: str | list[str], out_dir: str = "runs/sft", args: SFTArgs = SFTArgs(),
        dtype: str = "float32", device: str = "auto") -> None:
    """Fine-tune CHECKPOINT on conversations with loss on the assistant's tokens only (Baichuan 2 chat format).

    Data: JSON or JSONL with {"messages": [{"role", "content"}]}, ShareGPT {"conversations": [{"from",
    "value"}]} or Alpaca {"instruction", "input", "output"} records. Writes an HF-layout checkpoint with
    the tokenizer and Baichuan 2-Chat generation defaults to OUT_DIR (LoRA adapters are merged), and
    OUT_DIR-logs/ with metrics.jsonl and sft_result.json (held-out assistant loss before and after).

    Args:
        checkpoint: Base model directory (HF layout with tokenizer).
        data: Conversation files.
        out_dir: Output checkpoint directory.
        args: Training settings (--args.lora.r 8 for LoRA).
        dtype: Training dtype of the weights (float32 keeps fp32 master weights).
        device: auto | cpu | cuda | cuda:N.
    """
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.tokenizer import Tokenizer

    model = load_pretrained(checkpoint, dtype=dtype, device=device)
    tok = Tokenizer.from_pretrained(checkpoint)
    m = sft(model, tok, list(read_conversations(as_paths(data))), out_dir, args)
    print(f"sft: {m['steps']} steps on {m['train_conversations']} conversations in {m['seconds']} s; "
          f"held-out assistant loss {m['val_loss_before']:.4f} -> {m['val_loss_after']:.4f}; saved {out_dir}")


COMMANDS = run
