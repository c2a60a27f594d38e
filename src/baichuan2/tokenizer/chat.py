"""Chat formats: the checkpoint's own Jinja ``chat_template`` when its tokenizer carries one
(converted Llama-family models: ChatML, Llama 3 ...), Baichuan 2's otherwise.

Templated (``tok.chat_template`` set): ``build_chat_input`` renders the conversation as
``transformers``' ``apply_chat_template`` does (same ids), dropping the oldest rounds to fit like
the Baichuan format.  ``encode_chat`` renders growing prefixes of the conversation and diffs them, so
each message's text is known exactly; an assistant message's loss covers its content and the
template's end-of-turn token (the first special token after the content: ChatML's ``<|im_end|>``,
Llama 3's ``<|eot_id|>``), not the header that the prompt already holds or what follows the end
token.  A template whose renderings are not prefixes of each other is refused (no exact mask).

Baichuan 2: inference (``build_chat_input``) follows the official ``generation_utils.py``:
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

from baichuan2.tokenizer.template import render_chat
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
    """Prompt ids for the model to continue as the assistant (official semantics, or the chat template's)."""
    _validate(messages)
    if tok.chat_template is not None:
        return _templated_chat_input(tok, messages, max_new_tokens, model_max_length, max_input_tokens)
    system: list[int] = []
    if messages[0]["role"] == "system":
        system = tok.encode(messages[0]["content"])
        messages = messages[1:]
    max_history = model_max_length - max_new_tokens - len(system)
    if max_input_tokens is None:
        max_input_tokens = model_max_length - max_new_tokens
    rounds = _rounds(messages)
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
    if tok.chat_template is not None:
        return _templated_encode_chat(tok, messages, max_length)
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


def _rounds(messages: Sequence[Message]) -> list[list[Message]]:
    """Consecutive messages grouped into rounds, each starting at a user message."""
    rounds: list[list[Message]] = []
    for m in messages:
        if m["role"] == "user" or not rounds:
            rounds.append([])
        rounds[-1].append(m)
    return rounds


def _render(tok: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    return render_chat(tok.chat_template, messages, add_generation_prompt, tok.special_tokens())


def _templated_chat_input(tok: Tokenizer, messages: Sequence[Message], max_new_tokens: int,
                          model_max_length: int, max_input_tokens: int | None) -> list[int]:
    """The rendered conversation's ids with a generation prompt (after a user turn) or the final
    assistant message left open to be continued; oldest rounds dropped while it does not fit."""
    system = list(messages[:1]) if messages[0]["role"] == "system" else []
    rounds = _rounds(messages[len(system):])
    budget = model_max_length - max_new_tokens
    continue_final = messages[-1]["role"] == "assistant"

    def ids_for(kept: list[Message]) -> list[int]:
        text = _render(tok, kept, add_generation_prompt=not continue_final)
        if continue_final and kept[-1]["content"]:  # cut what the template adds after the last content
            end = text.rfind(kept[-1]["content"])
            if end >= 0:
                text = text[:end + len(kept[-1]["content"])]
        return tok.encode(text)

    kept = [m for rnd in rounds[-1:] for m in rnd]
    ids = ids_for(system + kept)  # the newest round is always kept
    for rnd in reversed(rounds[:-1]):
        longer = ids_for(system + rnd + kept)
        if len(longer) > budget:
            break
        kept, ids = list(rnd) + kept, longer
    if max_input_tokens is None:
        max_input_tokens = budget
    return ids[-max_input_tokens:]


def _templated_encode_chat(tok: Tokenizer, messages: Sequence[Message], max_length: int | None
                           ) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    trained: list[bool] = []

    def add(text: str, assistant: bool) -> None:
        piece = tok.encode(text)
        if assistant:  # content + the end-of-turn special token; what the template adds after it is not learned
            end = next((k for k, t in enumerate(piece) if t in tok.special_ids), len(piece) - 1)
            trained.extend(k <= end for k in range(len(piece)))
        else:
            trained.extend([False] * len(piece))
        ids.extend(piece)

    def step(before: str, after: str, i: int) -> str:
        if not after.startswith(before):
            raise InputError(f"the chat template is not prefix-stable at message {i} (rendering the first "
                             f"{i} messages is not the start of rendering more), so assistant-only loss masks "
                             "cannot be derived from it")
        return after[len(before):]

    done = ""
    for i, m in enumerate(messages):
        full = _render(tok, messages[:i + 1], add_generation_prompt=False)
        if m["role"] == "assistant":
            prompt = _render(tok, messages[:i], add_generation_prompt=True)
            add(step(done, prompt, i), False)
            add(step(prompt, full, i), True)
        else:
            add(step(done, full, i), False)
        done = full
    targets = [ids[j + 1] if trained[j + 1] else IGNORE_INDEX for j in range(len(ids) - 1)] + [IGNORE_INDEX]
    if max_length is not None:
        ids, targets = ids[:max_length], targets[:max_length]
    return ids, targets


def decode_chat(tok: Tokenizer, ids: Sequence[int]) -> list[dict[str, str]]:
    """Split Baichuan-format chat ids back into messages (the inverse of build_chat_input for whole rounds)."""
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
