"""The installed hf-tbn version, read from the package metadata (pyproject.toml is the one source)."""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version


@functools.cache
def version() -> str:
    """``hf-tbn``'s version, e.g. ``"0.1.0"``; ``"0+unknown"`` when run from a checkout that was never installed."""
    try:
        return _distribution_version("hf-tbn")
    except PackageNotFoundError:
        return "0+unknown"
