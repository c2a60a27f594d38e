"""Chat templates: the Jinja ``chat_template`` a Hugging Face tokenizer carries, rendered as transformers does.

Same environment as ``transformers``' ``apply_chat_template``: a sandbox (templates come with
downloaded checkpoints), ``trim_blocks``/``lstrip_blocks``, loop controls, ``raise_exception``,
``strftime_now``, a ``tojson`` that keeps non-ASCII text, and the special tokens (``bos_token``,
``eos_token`` ...) as variables.  ``{% generation %}`` blocks (TRL's assistant masks) render their body;
our masks come from rendering prefixes instead (``chat.encode_chat``), which works for every template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from baichuan2.utils.io import InputError


@lru_cache(maxsize=8)
def compile_template(source: str) -> Any:
    import jinja2
    from jinja2 import nodes  # noqa: F401  (the extension returns parsed nodes)
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):  # {% generation %} body {% endgeneration %} -> body
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise InputError(f"the tokenizer's chat_template is not valid Jinja: {e}") from None


def render_chat(source: str, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool,
                special_tokens: Mapping[str, str | None]) -> str:
    """The conversation as text, exactly as ``tokenizer.apply_chat_template(..., tokenize=False)``."""
    import jinja2

    try:
        return compile_template(source).render(messages=[dict(m) for m in messages],
                                               add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.exceptions.TemplateError as e:
        raise InputError(f"the chat template rejects this conversation: {e}") from None
