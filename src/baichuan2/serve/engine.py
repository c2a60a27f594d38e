"""One loaded model + tokenizer, generating text deltas for the chat CLI and the HTTP server.

Text is streamed by decoding the whole completion so far and emitting only what is new, holding back a
trailing U+FFFD: with byte-fallback tokens a Chinese character or emoji can span several tokens, and the
partial bytes must never be printed as a replacement character that later turns into the real one.
A lock serialises generation, so concurrent HTTP requests queue instead of corrupting the KV cache.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from baichuan2.model.generate import SamplingConfig, stream_tokens
from baichuan2.tokenizer.chat import Message, build_chat_input
from baichuan2.utils.io import InputError


@dataclass
class Delta:
    text: str  # new text since the previous delta
    finish_reason: str | None = None  # "stop" | "length" on the last delta
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class Engine:
    def __init__(self, checkpoint: str, dtype: str = "auto", device: str = "auto"):
        from baichuan2.model.checkpoint import load_pretrained
        from baichuan2.tokenizer import Tokenizer

        self.checkpoint = checkpoint
        self.model = load_pretrained(checkpoint, dtype=dtype, device=device).eval()
        self.tok = Tokenizer.from_pretrained(checkpoint)
        self.max_length = self.model.config.max_position_embeddings
        stop = [self.model.config.eos_token_id]
        if (Path(checkpoint) / "generation_config.json").exists():
            self.defaults = SamplingConfig.from_generation_config(checkpoint)
        else:
            self.defaults = SamplingConfig.chat(stop_token_ids=stop)
        if not self.defaults.stop_token_ids:
            self.defaults = replace(self.defaults, stop_token_ids=stop)
        self.lock = threading.Lock()

    def sampling(self, **overrides) -> SamplingConfig:
        """The checkpoint's defaults with the given (non-None) overrides; raises ValueError when invalid."""
        values = {k: v for k, v in overrides.items() if v is not None}
        if values.get("temperature") == 0:
            values["do_sample"] = False
        return replace(self.defaults, **values)

    def chat_prompt(self, messages: Sequence[Message], max_new_tokens: int) -> list[int]:
        if max_new_tokens >= self.max_length:
            raise InputError(f"max_tokens {max_new_tokens} leaves no room for the prompt "
                             f"(context length {self.max_length})")
        ids = build_chat_input(self.tok, messages, max_new_tokens, self.max_length)
        if not messages or messages[-1]["role"] != "user":
            raise InputError("the last message must come from the user")
        return ids

    def text_prompt(self, prompt: str, max_new_tokens: int) -> list[int]:
        ids = [self.tok.bos_id] + self.tok.encode(prompt)
        if len(ids) + max_new_tokens > self.max_length:
            raise InputError(f"prompt ({len(ids)} tokens) + max_tokens ({max_new_tokens}) exceeds the context "
                             f"length {self.max_length}")
        return ids

    def stream(self, prompt_ids: list[int], cfg: SamplingConfig, stop: Sequence[str] = ()) -> Iterator[Delta]:
        """Text deltas of one completion; the last delta carries the finish reason and token counts.

        Text that could be the start of a stop string is held back until it is known not to be one, so a
        stop string split over several tokens never leaks into the stream."""
        stop = [s for s in stop if s]
        with self.lock:
            ids: list[int] = []
            shown = ""
            stops = set(cfg.stop_token_ids)
            finish = "length"
            text = ""
            for step in stream_tokens(self.model, [prompt_ids], cfg):
                token = int(step[0])
                if token < 0 or token in stops:
                    finish = "stop"
                    break
                ids.append(token)
                text = self.tok.decode(ids)
                hits = [text.index(s) for s in stop if s in text]
                if hits:
                    text, finish = text[: min(hits)], "stop"
                    break
                if text.endswith("\ufffd"):
                    continue  # an incomplete UTF-8 sequence: wait for the rest of the character
                safe = len(text) - _stop_prefix_len(text, stop)
                if safe > len(shown) and text.startswith(shown):
                    yield Delta(text[len(shown):safe])
                    shown = text[:safe]
            tail = text[len(shown):] if text.startswith(shown) else ""
            yield Delta(tail, finish, len(prompt_ids), len(ids))

    def complete(self, prompt_ids: list[int], cfg: SamplingConfig, stop: Sequence[str] = ()) -> Delta:
        parts = list(self.stream(prompt_ids, cfg, stop))
        return Delta("".join(p.text for p in parts), parts[-1].finish_reason, parts[-1].prompt_tokens,
                     parts[-1].completion_tokens)
