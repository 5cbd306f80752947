"""Generated blocks of the docs: the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``."""

from __future__ import annotations

import re
from pathlib import Path


def replace_block(doc: Path, name: str, text: str) -> None:
    """Write ``text`` into the ``name`` block of ``doc``; a ValueError when the doc has no such block."""
    pattern = re.compile(rf"(<!-- {re.escape(name)}:start -->\n).*?(<!-- {re.escape(name)}:end -->)", re.S)
    content = doc.read_text()
    if not pattern.search(content):
        raise ValueError(f"{doc} has no <!-- {name}:start --> / <!-- {name}:end --> block")
    doc.write_text(pattern.sub(lambda m: m.group(1) + text + m.group(2), content))
    print(f"wrote the {name} block of {doc}")
