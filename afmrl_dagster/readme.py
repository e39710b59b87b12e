"""Result tables in docs/results.md (and the demo's in the README) are written by the scripts
that measure them, between markers ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``."""

from __future__ import annotations

import os
import re
from pathlib import Path


def write_block(path: str | os.PathLike, name: str, content: str) -> bool:
    """Replace the block ``name`` of the file with ``content`` (atomically); False when the markers are absent."""
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        return False
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(pattern.sub(lambda _: f"{start}\n{content}\n{end}", text, count=1))
    os.replace(temporary, path)
    return True


def publish_result(text: str, results_file: str | os.PathLike | None, name: str) -> int:
    """Print a benchmark's result and, with ``results_file`` (docs/results.md), write it into that
    file's ``name`` block; the exit status: 1 when the file lacks the block, else 0."""
    import sys

    print(text)
    if results_file and not write_block(results_file, name, text):
        print(f"{results_file} has no <!-- {name}:start --> ... <!-- {name}:end --> block", file=sys.stderr)
        return 1
    return 0
