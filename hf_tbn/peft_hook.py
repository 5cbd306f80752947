"""Register hf_tbn's LoRA layers with peft when peft is imported, not before.

Importing peft costs about 200 MB of memory; inference-only users of hf_tbn never pay it,
while every ``LoraConfig`` still knows TBN layers whichever of the two packages comes first.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType


def _register(_: ModuleType | None = None) -> None:
    from .lora import register_with_peft

    register_with_peft()


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds ``peft`` through the other finders and runs the registration right after it loads."""

    _looking = False

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "peft" or self._looking:
            return None
        # Stay installed until peft actually loads: a bare find_spec("peft") probe (transformers'
        # is_peft_available) must not use up the hook. The flag keeps the lookup below from finding us.
        self._looking = True
        try:
            spec = importlib.util.find_spec("peft")
        finally:
            self._looking = False
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            load(module)
            _register(module)

        spec.loader.exec_module = exec_module
        return spec


def register_with_peft_on_import() -> None:
    """Register now if peft is loaded, else as soon as it is imported; idempotent."""
    if "peft" in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterPeftImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftImport())
