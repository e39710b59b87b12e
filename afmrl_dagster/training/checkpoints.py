"""Training checkpoints: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint root holds numbered checkpoint folders and a ``LATEST`` file naming the
complete one. A new checkpoint is written into a temporary folder, renamed into place, and
only then is ``LATEST`` replaced (an atomic file rename) and older folders removed, so a
crash at any point leaves the previous checkpoint loadable. No pickles: nested state such as
an optimizer's ``state_dict`` is split by :func:`flatten_tensors` into named tensors and a
JSON structure that refers to them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST_FILE = "LATEST"
TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"
FOLDER_PREFIX = "checkpoint-"
STAGING_PREFIX = ".staging-"


def _write_text_atomically(path: Path, text: str) -> None:
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def _latest_folder(root: Path) -> Path | None:
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text(encoding="utf-8").strip()
    return folder if (folder / META_FILE).is_file() and (folder / TENSORS_FILE).is_file() else None


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a complete checkpoint written by :func:`save_checkpoint`."""
    return _latest_folder(Path(directory)) is not None


def checkpoint_step(directory: str | os.PathLike | None) -> int | None:
    """The optimizer step of the latest complete checkpoint in ``directory`` (a training's
    checkpoint), or None when there is none to resume from."""
    if directory is None or (folder := _latest_folder(Path(directory))) is None:
        return None
    progress = json.loads((folder / META_FILE).read_text(encoding="utf-8")).get("progress", {})
    return int(progress.get("global_step", 0))


def save_checkpoint(directory: str | os.PathLike, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``state`` (named tensors) and ``meta`` (JSON-able) as the new latest checkpoint of ``directory``.

    All or nothing: until the new checkpoint is complete the previous one stays the latest;
    afterwards the previous one is deleted. Returns the new checkpoint's folder.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    previous = _latest_folder(root)
    number = int(previous.name.removeprefix(FOLDER_PREFIX)) + 1 if previous is not None else 1
    target = root / f"{FOLDER_PREFIX}{number:08d}"
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    try:
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
        save_file(tensors, str(staging / TENSORS_FILE))
        (staging / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if target.exists():
            # Left over from a crash after the rename but before LATEST moved on: not referenced.
            shutil.rmtree(target)
        os.replace(staging, target)
        _write_text_atomically(root / LATEST_FILE, target.name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for stale in root.iterdir():
        if stale != target and stale.is_dir() and stale.name.startswith((FOLDER_PREFIX, STAGING_PREFIX)):
            shutil.rmtree(stale, ignore_errors=True)
    return target


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state, meta)`` of the latest complete checkpoint in ``directory``; FileNotFoundError when none."""
    folder = _latest_folder(Path(directory))
    if folder is None:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    return load_file(str(folder / TENSORS_FILE)), json.loads((folder / META_FILE).read_text(encoding="utf-8"))


def flatten_tensors(value: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split nested dicts/lists/tuples into a JSON structure and the tensors it names.

    Containers are tagged so that :func:`unflatten_tensors` restores them exactly, including
    integer dict keys (an optimizer's state is keyed by parameter index) and tuples.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(item: Any, path: str) -> Any:
        if isinstance(item, torch.Tensor):
            tensors[path] = item
            return {"tensor": path}
        if isinstance(item, dict):
            return {"dict": [[key, walk(inner, f"{path}.{key}")] for key, inner in item.items()]}
        if isinstance(item, (list, tuple)):
            kind = "tuple" if isinstance(item, tuple) else "list"
            return {kind: [walk(inner, f"{path}.{index}") for index, inner in enumerate(item)]}
        if item is None or isinstance(item, (bool, int, float, str)):
            return {"value": item}
        raise TypeError(f"cannot store {type(item).__name__} at {path} in a checkpoint")

    return walk(value, prefix), tensors


def unflatten_tensors(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_tensors`."""
    (kind, payload), = structure.items()
    if kind == "tensor":
        return tensors[payload]
    if kind == "dict":
        return {key: unflatten_tensors(inner, tensors) for key, inner in payload}
    if kind == "list":
        return [unflatten_tensors(inner, tensors) for inner in payload]
    if kind == "tuple":
        return tuple(unflatten_tensors(inner, tensors) for inner in payload)
    return payload


def config_fingerprint(config: Any, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The dataclass ``config`` as a flat ``{"field.subfield": value}`` dict, minus ``exclude``d fields."""
    flat = {}

    def walk(item: Any, path: str) -> None:
        if dataclasses.is_dataclass(item):
            for field in dataclasses.fields(item):
                walk(getattr(item, field.name), f"{path}.{field.name}" if path else field.name)
        elif path not in exclude:
            flat[path] = list(item) if isinstance(item, tuple) else item

    walk(config, "")
    return json.loads(json.dumps(flat, default=str))


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise ValueError naming every field whose value differs between a checkpoint and the current run."""
    differing = sorted(name for name in saved.keys() | current.keys() if saved.get(name) != current.get(name))
    if differing:
        details = ", ".join(f"{name} (checkpoint {saved.get(name)!r}, now {current.get(name)!r})" for name in differing)
        raise ValueError(f"cannot resume: the run differs from the checkpoint in {details}")
