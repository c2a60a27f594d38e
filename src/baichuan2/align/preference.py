"""Preference pairs (chosen vs rejected answers) from the common public layouts, as Baichuan messages.

Accepted records (JSON array or JSONL, also .gz/.zst), detected per record:
  hh-rlhf         {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."} (whole transcripts)
  ShareGPT DPO    {"conversations": [{"from", "value"}], "chosen": {"from", "value"}, "rejected": {...}}
  messages        {"messages" | "prompt": [...] | "...", "chosen": "...", "rejected": "..."}
  Alpaca DPO      {"instruction", "input", "chosen", "rejected"}
Optional fields: ``category`` ("a/b/c" path of the prompt taxonomy) and ``gap`` (annotated preference
strength, e.g. Baichuan's 1-5 "unsure" ... "significantly better").
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from baichuan2.align.sft import to_messages
from baichuan2.utils.io import InputError, iter_records

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


@dataclass
class Pair:
    chosen: list[dict]  # whole conversation ending with the preferred assistant turn
    rejected: list[dict]
    category: str | list | None = None
    gap: float | None = None

    @property
    def prompt_text(self) -> str:
        """The user's words (what the taxonomy classifies)."""
        return "\n".join(m["content"] for m in self.chosen if m["role"] == "user")


def hh_transcript(text: str, where: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3:
        raise InputError(f"{where}: transcript has no '\\n\\nHuman: ' / '\\n\\nAssistant: ' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]


def _answer(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "value" in value:
        return str(value["value"])
    if isinstance(value, dict) and "content" in value:
        return str(value["content"])
    raise InputError(f"{where}: chosen/rejected must be a string or a {{'value'|'content': ...}} message")


def to_pair(record: dict, where: str = "record") -> Pair:
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise InputError(f"{where}: expected an object with 'chosen' and 'rejected'")
    meta = dict(category=record.get("category"), gap=record.get("gap", record.get("score_gap")))
    c, r = record["chosen"], record["rejected"]
    if isinstance(c, str) and isinstance(r, str) and "\n\nAssistant:" in c and not (
            {"conversations", "messages", "prompt", "instruction"} & record.keys()):
        chosen, rejected = hh_transcript(c, where), hh_transcript(r, where)
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise InputError(f"{where}: a transcript must end with an Assistant turn")
        return Pair(chosen, rejected, **meta)
    if "conversations" in record:
        prompt = to_messages({"conversations": record["conversations"]}, where)
    elif "messages" in record:
        prompt = to_messages({"messages": record["messages"]}, where)
    elif isinstance(record.get("prompt"), list):
        prompt = to_messages({"messages": record["prompt"]}, where)
    elif isinstance(record.get("prompt"), str):
        prompt = [{"role": "user", "content": record["prompt"]}]
    elif "instruction" in record:
        prompt = [{"role": "user", "content": record["instruction"] + (
            "\n" + record["input"] if record.get("input") else "")}]
    else:
        raise InputError(f"{where}: no prompt ('conversations', 'messages', 'prompt' or 'instruction')")
    if not prompt or prompt[-1]["role"] != "user":
        raise InputError(f"{where}: the prompt must end with a user turn")
    return Pair(prompt + [{"role": "assistant", "content": _answer(c, where)}],
                prompt + [{"role": "assistant", "content": _answer(r, where)}], **meta)


def read_pairs(paths: Sequence[str]) -> Iterator[Pair]:
    """Pairs from JSON-array or JSONL files; a malformed record is an InputError naming file and line."""
    for path in paths:
        for where, record in iter_records(path):
            yield to_pair(record, where)


def to_prompt(record, where: str = "record") -> list[dict]:
    """A conversation ending with a user turn, for rollouts or red-teaming, from any of the layouts above or
    ``{"prompt" | "question" | "text": "..."}`` (BELLE eval sets use "question") or a bare string."""
    if isinstance(record, str):
        return [{"role": "user", "content": record}]
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected an object or a string")
    if "chosen" in record and "rejected" in record:
        return to_pair(record, where).chosen[:-1]
    if "messages" in record or "conversations" in record or ("instruction" in record and "output" in record):
        msgs = to_messages(record, where)
    elif "instruction" in record:
        msgs = to_messages({**record, "output": ""}, where)
    elif isinstance(record.get("prompt"), list):
        msgs = to_messages({"messages": record["prompt"]}, where)
    else:
        text = next((record[k] for k in ("prompt", "question", "text") if isinstance(record.get(k), str)), None)
        if text is None:
            raise InputError(f"{where}: no prompt field ('prompt', 'question', 'text', 'messages', ...)")
        msgs = [{"role": "user", "content": text}]
    while msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        raise InputError(f"{where}: the conversation has no user turn to answer")
    return msgs


def read_prompts(paths: Sequence[str]) -> Iterator[tuple[list[dict], dict]]:
    """``(messages ending with a user turn, the record)`` from JSON-array or JSONL files."""
    for path in paths:
        for where, record in iter_records(path):
            yield to_prompt(record, where), (record if isinstance(record, dict) else {})
