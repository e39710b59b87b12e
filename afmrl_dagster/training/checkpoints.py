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
import random
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
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
    """Where the latest complete checkpoint in ``directory`` stands: an encoder training's optimizer
    step, a training loop's units done (:class:`LoopCheckpoint`); None when there is none to resume from."""
    if directory is None or (folder := _latest_folder(Path(directory))) is None:
        return None
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    return int(meta["loop"]["done"]) if "loop" in meta else int(meta.get("progress", {}).get("global_step", 0))


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


def rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """Every random generator training might draw from: torch (CPU, CUDA), numpy and python globals."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    name, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return tensors, {
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, device: torch.device) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    name, keys, position, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


LOOP_FORMAT = 1


@dataclasses.dataclass
class LoopCheckpoint:
    """Checkpoints of a training loop over numbered units (a generator's SFT epochs, its GRPO steps):
    the module's trainable tensors, the optimizer, the schedule, the random generators and the
    history, written every ``every`` units into ``directory``. A loop asks :meth:`resume` where to
    start (0 with nothing saved) and calls :meth:`save` after each unit; a killed run started again
    with the same ``fingerprint`` goes on from the last unit saved. Order of data that the loop
    draws from its own seeded generators is replayed by the loop itself."""

    directory: str | os.PathLike | None = None  # None: no checkpoints
    fingerprint: dict = dataclasses.field(default_factory=dict)
    every: int = 1

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"checkpoint every must be >= 1 unit, got {self.every}")

    def resume(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule=None,
               generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> tuple[int, list[dict]]:
        """Load the latest checkpoint into ``module`` (its trainable tensors), ``optimizer``,
        ``schedule`` and ``generator``; return (units done, their history). (0, []) when none."""
        if self.directory is None or not has_checkpoint(self.directory):
            return 0, []
        state, meta = load_checkpoint(self.directory)
        if meta.get("format") != LOOP_FORMAT or "loop" not in meta:
            raise ValueError(f"{self.directory} holds no training-loop checkpoint this code reads (format {meta.get('format')!r})")
        check_fingerprint(meta["fingerprint"], json.loads(json.dumps(self.fingerprint, default=str)))
        weights = {name.removeprefix("module."): tensor for name, tensor in state.items() if name.startswith("module.")}
        missing = [name for name, p in module.named_parameters() if p.requires_grad and name not in weights]
        if missing:
            raise ValueError(f"checkpoint in {self.directory} lacks trainable tensors {missing[:5]}")
        module.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(unflatten_tensors(meta["optimizer"], state))
        if schedule is not None:
            schedule.load_state_dict(unflatten_tensors(meta["schedule"], state))
        if generator is not None:
            generator.set_state(state["rng.generator"])
        set_rng_state(state, meta["rng"], torch.device(device))
        return int(meta["loop"]["done"]), meta["loop"]["history"]

    def save(self, done: int, total: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer, history: list[dict],
             schedule=None, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> None:
        """Checkpoint after ``done`` of ``total`` units, when ``every`` divides it or it is the last."""
        if self.directory is None or (done % self.every and done != total):
            return
        optimizer_structure, optimizer_tensors = flatten_tensors(optimizer.state_dict(), "optimizer")
        state = {f"module.{name}": p.detach() for name, p in module.named_parameters() if p.requires_grad}
        state.update(optimizer_tensors)
        meta: dict = {"format": LOOP_FORMAT, "fingerprint": json.loads(json.dumps(self.fingerprint, default=str)),
                      "optimizer": optimizer_structure, "loop": {"done": done, "total": total, "history": json.loads(json.dumps(history, default=float))}}
        if schedule is not None:
            meta["schedule"], schedule_tensors = flatten_tensors(schedule.state_dict(), "schedule")
            state.update(schedule_tensors)
        if generator is not None:
            state["rng.generator"] = generator.get_state()
        rng_tensors, meta["rng"] = rng_state(torch.device(device))
        save_checkpoint(self.directory, {**state, **rng_tensors}, meta)
