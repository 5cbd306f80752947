"""Run a function right after a module is imported, without importing it ourselves.

``import hf_tbn`` must stay light (docs/foundation.md): transformers' quantizer registry
(``transformers.quantizers.auto`` imports every quantizer, about half a second) and peft (about
200 MB) are only touched once the user's own code imports them. One finder on ``sys.meta_path``
waits for those modules and removes itself when nothing is pending.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

_PENDING: dict[str, list[Callable[[], None]]] = {}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds a pending module through the path finder and runs its callbacks right after it executes."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _PENDING:
            return None
        # A bare probe (transformers' is_peft_available calls find_spec) must not use up the hook: the
        # callbacks run only when the module really executes.
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            load(module)
            for callback in _PENDING.pop(fullname, []):
                callback()
            if not _PENDING and _FINDER in sys.meta_path:
                sys.meta_path.remove(_FINDER)

        spec.loader.exec_module = exec_module
        return spec


_FINDER = _AfterImport()


def after_import(module: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` now if ``module`` is imported, else right after its first import."""
    if module in sys.modules:
        callback()
        return
    _PENDING.setdefault(module, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
