"""Content fingerprints: the cache keys that let a rerun with unchanged inputs reuse its output."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import polars as pl

# Bump when a stage's logic changes in a way that invalidates cached outputs.
CODE_VERSION = "1"


def frame_fingerprint(frame: pl.DataFrame, columns: list[str] | None = None) -> str:
    """A hash of a frame's content (row order included), stable across processes."""
    selected = frame.select(columns) if columns else frame
    digest = hashlib.sha256(",".join(f"{n}:{t}" for n, t in selected.schema.items()).encode())
    if selected.height:
        digest.update(selected.hash_rows(seed=0, seed_1=1, seed_2=2, seed_3=3).to_numpy().tobytes())
    return digest.hexdigest()


def fingerprint(*parts) -> str:
    """Hash of strings, frames, dataclasses and JSON-able values, in order."""
    digest = hashlib.sha256(CODE_VERSION.encode())
    for part in parts:
        if isinstance(part, pl.DataFrame):
            text = frame_fingerprint(part)
        elif dataclasses.is_dataclass(part):
            text = json.dumps(dataclasses.asdict(part), sort_keys=True, default=str)
        elif isinstance(part, str):
            text = part
        else:
            text = json.dumps(part, sort_keys=True, default=str)
        digest.update(b"\x00" + text.encode())
    return digest.hexdigest()[:24]
