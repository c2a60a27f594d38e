"""Baichuan 2 chat format.

Inference (``build_chat_input``) follows the official ``generation_utils.py``:
an optional system message encoded raw, then rounds ``[195] user [196]
assistant`` with no EOS between turns, the newest rounds kept within
``model_max_length - max_new_tokens`` tokens, a trailing ``196`` when the
model should answer, and left truncation to ``max_input_tokens``.

Training (``encode_chat``) follows the official ``fine-tune.py``: the loss
covers assistant tokens and the EOS that ends each assistant turn, nothing
else.  Targets are returned already aligned (``targets[i]`` is the token to
predict after ``input_ids[i]``, -100 = no loss) as the model expects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from baichuan2.tokenizer.tokenizer import Tokenizer
from baichuan2.utils.io import InputError

IGNORE_INDEX = -100
Message = Mapping[str, str]


def _validate(messages: Sequence[Message]) -> None:
    if not messages:
        raise InputError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise InputError(f"message {i} must be an object with 'role' and 'content', got {m!r}")
        if m["role"] not in ("system", "user", "assistant"):
            raise InputError(f"message {i}: role must be system, user or assistant, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise InputError(f"message {i}: content must be a string")
        if m["role"] == "system" and i != 0:
            raise InputError(f"message {i}: a system message may only come first")


def build_chat_input(tok: Tokenizer, messages: Sequence[Message], max_new_tokens: int = 2048,
                     model_max_length: int = 4096, max_input_tokens: int | None = None) -> list[int]:
    """Prompt ids for the model to continue as the assistant (official semantics)."""
    _validate(messages)
    system: list[int] = []
    if messages[0]["role"] == "system":
        system = tok.encode(messages[0]["content"])
        messages = messages[1:]
    max_history = model_max_length - max_new_tokens - len(system)
    if max_input_tokens is None:
        max_input_tokens = model_max_length - max_new_tokens
    rounds: list[list[Message]] = []
    for m in messages:
        if m["role"] == "user" or not rounds:
            rounds.append([])
        rounds[-1].append(m)
    history: list[int] = []
    for rnd in reversed(rounds):
        ids: list[int] = []
        for m in rnd:
            ids += [tok.user_id if m["role"] == "user" else tok.assistant_id] + tok.encode(m["content"])
        if history and len(history) + len(ids) > max_history:
            break  # the newest round is always kept
        history = ids + history
    ids = system + history
    if not messages or messages[-1]["role"] != "assistant":
        ids.append(tok.assistant_id)
    return ids[-max_input_tokens:]


def encode_chat(tok: Tokenizer, messages: Sequence[Message], max_length: int | None = None
                ) -> tuple[list[int], list[int]]:
    """``(input_ids, targets)`` for supervised fine-tuning with assistant-only loss.

    Same tokens and loss as the official fine-tune.py: after ``[196]`` and every
    assistant token the model learns the next assistant token, and after the
    last one it learns EOS (in the input stream the next turn's ``[195]`` or a
    final EOS follows).  System and user tokens carry no loss.
    """
    _validate(messages)
    ids: list[int] = []
    targets: list[int] = []
    for m in messages:
        content = tok.encode(m["content"])
        if m["role"] == "system":
            ids += content
            targets += [IGNORE_INDEX] * len(content)
        elif m["role"] == "user":
            ids += [tok.user_id] + content
            targets += [IGNORE_INDEX] * (len(content) + 1)
        else:
            ids += [tok.assistant_id] + content
            targets += content + [tok.eos_id]
    ids.append(tok.eos_id)
    targets.append(IGNORE_INDEX)
    if max_length is not None:
        ids, targets = ids[:max_length], targets[:max_length]
    return ids, targets


def decode_chat(tok: Tokenizer, ids: Sequence[int]) -> list[dict[str, str]]:
    """Split chat ids back into messages (the inverse of build_chat_input for whole rounds)."""
    messages: list[dict[str, str]] = []
    role, buf = "system", []

    def flush() -> None:
        if buf or role != "system":
            messages.append({"role": role, "content": tok.decode(buf)})

    for t in ids:
        if t in (tok.user_id, tok.assistant_id):
            flush()
            role, buf = ("user" if t == tok.user_id else "assistant"), []
        elif t == tok.eos_id:
            continue
        else:
            buf.append(t)
    flush()
    return messages
