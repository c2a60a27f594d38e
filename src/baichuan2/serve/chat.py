"""`baichuan2 chat`: an interactive, streaming chat in the terminal (like the official cli_demo.py).

Commands typed at the prompt: `clear` (or `:clear`) forgets the conversation, `exit`/`quit` (or
Ctrl-D) leaves.  Answers stream as they are generated; the history is kept within the context window
(oldest rounds dropped first, as the official build_chat_input does).
"""

from __future__ import annotations

import sys


def chat(checkpoint: str, system: str | None = None, temperature: float | None = None, top_k: int | None = None,
         top_p: float | None = None, repetition_penalty: float | None = None, max_new_tokens: int = 512,
         greedy: bool = False, seed: int | None = None, dtype: str = "auto", device: str = "auto",
         quantize: str | None = None) -> None:
    """Chat with a checkpoint in the terminal, streaming the answers.

    Type `clear` to start a new conversation, `exit` or `quit` (or Ctrl-D) to leave. Sampling defaults
    come from the checkpoint's generation_config.json (Baichuan 2 chat: temperature 0.3, top_k 5,
    top_p 0.85, repetition penalty 1.05); flags override them.

    Args:
        checkpoint: Model directory (HF layout with tokenizer).
        system: Optional system message.
        temperature: Sampling temperature (0 = greedy).
        top_k: Keep the k most likely tokens (0 = off).
        top_p: Nucleus sampling mass.
        repetition_penalty: Penalty on tokens already present (1 = off).
        max_new_tokens: Longest answer, in tokens.
        greedy: Always take the most likely token (reproducible answers).
        seed: Random seed for reproducible sampling.
        dtype: auto | float32 | bfloat16 | float16.
        device: auto | cpu | cuda | cuda:N.
        quantize: int8 | int4: weight-only quantize a full-precision checkpoint on load.
    """
    from baichuan2.serve.engine import Engine
    from baichuan2.utils.io import InputError

    engine = Engine(checkpoint, dtype=dtype, device=device, quantize=quantize)
    try:
        cfg = engine.sampling(temperature=0 if greedy else temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed)
    except ValueError as e:
        raise SystemExit(f"chat: {e}") from None
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    print("Baichuan 2 chat - type 'clear' to start over, 'exit' to quit.", flush=True)
    while True:
        try:
            line = input("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        cmd = line.strip().lower()
        if cmd in ("exit", "quit", ":exit", ":quit", ":q"):
            return
        if cmd in ("clear", ":clear"):
            history = history[:1] if system else []
            print("(conversation cleared)", flush=True)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            ids = engine.chat_prompt(history, cfg.max_new_tokens)
        except InputError as e:
            print(f"(error: {e})", flush=True)
            history.pop()
            continue
        sys.stdout.write("\nBaichuan 2: ")
        answer = []
        try:
            for delta in engine.stream(ids, cfg):
                answer.append(delta.text)
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this answer, keep the session
            print(" (interrupted)")
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(answer)})


COMMANDS = chat
