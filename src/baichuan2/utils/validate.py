"""Config checks that fail with one line naming the setting and what it may be (``InputError``).

Dataclass configs call these from ``__post_init__``, so a bad value is refused where it is
parsed (the CLI prints the line), not as a ZeroDivisionError deep inside a run.
"""

from __future__ import annotations

from typing import Any

from baichuan2.utils.io import InputError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_ints(config: Any, prefix: str, *names: str, minimum: int = 1) -> None:
    """``prefix.name`` must be an integer >= ``minimum`` for every name (e.g. ``data.seq_len``)."""
    for name in names:
        value = getattr(config, name)
        if not _is_int(value) or value < minimum:
            allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise InputError(f"{prefix}.{name} must be {allowed}, got {value!r}")
