"""Baichuan 2, end to end: data, tokenizer, model, pretraining, scaling laws, alignment, evaluation, serving.

``import baichuan2`` makes ``transformers``' Auto classes know ``model_type
"baichuan"`` (so ``AutoModelForCausalLM.from_pretrained(dir)`` loads our and the
official checkpoints without remote code).  Registration happens as soon as
``transformers`` is imported, before or after this package, so the CLI and
code that never touch ``transformers`` do not pay its multi-second import.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    try:
        from baichuan2.model import hf  # noqa: F401  (registers on import)
        from baichuan2.tokenizer import hf as tokenizer_hf  # noqa: F401
    except Exception as e:  # an incompatible transformers must not break the rest of the package
        warnings.warn(f"baichuan2: could not register with transformers' Auto classes: {e}", stacklevel=2)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Post-import hook: run the registration right after ``import transformers`` completes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            _register_with_transformers()

        loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
