"""Checkpoints of a run, so that a killed run resumes to the same numbers it would have reached.

Every ``simulation.checkpoint_every`` rounds (and after the last) the ServerApp writes
``<run dir>/checkpoint/round_<r>/``:

- ``state.json``: the run's state (the round, the config, the strategy's ``round_state``, the
  per-round records, the grid's counters, the wall time so far) as JSON, each tensor or numpy array
  in it replaced by ``{"__tensor__": key}`` or ``{"__ndarray__": key}`` (``encode``), and the
  SHA-256 of the tensor file, so a corrupt tensor file is noticed rather than resumed from;
- ``tensors.safetensors``: those tensors under their keys (the global arrays are ``arrays/<name>``);
- ``client_state/``: a snapshot of the disk client-state store made of hard links (the store
  replaces files atomically, so a snapshot never changes after it is taken and costs no copy); its
  files and their sizes are listed in ``state.json``, so a snapshot that lost a file is noticed.

A checkpoint is written into a temporary folder that is renamed into place once complete; the two
newest are kept. No pickle: a checkpoint holds data only, never code, so loading one runs nothing.
Checkpoints written before this format (``state.pkl``) cannot be read; such a run starts over in a
new run directory.

Resuming (the same command with ``hydra.run.dir`` set to the run's directory) reads the newest
checkpoint that can be read (falling back to the older one, with a warning naming the bad file),
restores the store from its snapshot, so client updates made after the checkpoint are discarded,
and goes on from the next round; rounds seed sampling and SGD, so the result equals an
uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from octomil_sim.errors import ConfigError

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
TENSOR_FILE = "tensors.safetensors"
KEEP = 2  # the newest checkpoint, and one to fall back to if it cannot be read
TENSOR, NDARRAY = "__tensor__", "__ndarray__"
ALLOWED = "tensors, numpy arrays, numbers, strings, booleans, None, and lists and str-keyed dicts of them"

log = logging.getLogger(__name__)


class UnreadableCheckpoint(Exception):
    """One checkpoint folder cannot be read; the message names the file and what is wrong."""


# --- encoding: JSON plus a tensor file ------------------------------------------------------------
def _escape(name: str) -> str:
    """A dict key as one segment of a tensor key (JSON-pointer escaping, so paths never collide)."""
    return name.replace("~", "~0").replace("/", "~1")


def encode(state) -> tuple[object, dict[str, torch.Tensor]]:
    """``state`` as ``(json_value, tensors)``: every tensor and numpy array moved into ``tensors``
    under its path in ``state`` (``arrays/fc.weight``), a ``{"__tensor__": path}`` placeholder left in
    its place. Anything but ``ALLOWED`` raises a ``TypeError`` naming its path: JSON would turn a
    tuple into a list and an int dict key into a string, and a resumed run must get back exactly
    what was saved."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(state, "", tensors), tensors


_PLAIN = frozenset({type(None), bool, int, float, str})  # exactly these types (np.float64 is a float subclass)


def _encode(value, path: str, tensors: dict[str, torch.Tensor]):
    where = path or "the state"
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().clone().contiguous()  # own memory: safetensors refuses shared tensors
        return {TENSOR: path}
    if isinstance(value, np.generic) and not isinstance(value, np.object_):
        return value.item()  # a numpy scalar (np.float32, np.int64, np.bool_) as the Python number it holds
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"checkpoint value {where}: a numpy array of Python objects; allowed: {ALLOWED}")
        tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
        return {NDARRAY: path}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):  # (plain leaves inline: a 1,000-round run's rows are 10,000 of them)
        return [v if type(v) in _PLAIN else _encode(v, _join(path, str(i)), tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str) or k in (TENSOR, NDARRAY):
                raise TypeError(f"checkpoint key {_join(path, repr(k))}: of type {type(k).__name__}; allowed: "
                                f"strings other than {TENSOR} and {NDARRAY} (JSON would make an int key a string)")
        return {k: v if type(v) in _PLAIN else _encode(v, _join(path, _escape(k)), tensors) for k, v in value.items()}
    hint = " (a tuple would come back as a list: store a list)" if isinstance(value, tuple) else ""
    raise TypeError(f"checkpoint value {where}: of type {type(value).__name__}; allowed: {ALLOWED}{hint}")


def _join(path: str, segment: str) -> str:
    return f"{path}/{segment}" if path else segment


def decode(value, tensors: dict[str, torch.Tensor]):
    """The inverse of ``encode``: placeholders replaced by their tensors (numpy arrays for
    ``__ndarray__``). A placeholder whose tensor is missing raises ``KeyError``."""
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            return tensors[value[TENSOR]]
        if set(value) == {NDARRAY}:
            return tensors[value[NDARRAY]].numpy()
        return {k: decode(v, tensors) for k, v in value.items()}
    return value


# --- one checkpoint folder -----------------------------------------------------------------------
def _link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=os.link)


def _round_of(folder: Path) -> int:
    return int(folder.name.removeprefix("round_"))


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The run directory's checkpoint folders, newest first (temporary ones excluded)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    found = [p for p in root.glob("round_*") if p.is_dir() and p.name.removeprefix("round_").isdigit()]
    return sorted(found, key=_round_of, reverse=True)


class RawJSON(str):
    """A top-level value of a checkpoint's state given as its JSON text (what ``json.dumps`` of the
    value gives), written as is: a value that grows with the run and was encoded piece by piece as
    it grew (the rows of the rounds so far) is not encoded again at every checkpoint."""


def save_checkpoint(run_dir: Path, server_round: int, state: dict, client_state: Path | None) -> Path:
    """Write the checkpoint of ``server_round`` (``state`` as ``encode`` allows, plus top-level
    ``RawJSON`` values; checked before anything is written) and keep it and the one before it,
    removing the rest."""
    raw = {key: value for key, value in state.items() if isinstance(value, RawJSON)}
    marks = {key: f"\x00{key}\x00" for key in raw}  # stand-ins no encoded value can be
    document, tensors = encode({key: marks.get(key, value) for key, value in state.items()})
    data = save_tensors(tensors)
    root = Path(run_dir) / CHECKPOINT_DIR
    name = f"round_{server_round:06d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / TENSOR_FILE).write_bytes(data)
    if client_state is not None and Path(client_state).exists():
        _link_tree(Path(client_state), tmp / "client_state")
    text = json.dumps({"tensors_sha256": hashlib.sha256(data).hexdigest(),
                       "client_state_files": _sizes(tmp / "client_state"), "state": document})
    for key, value in raw.items():
        text = text.replace(json.dumps(marks[key]), value, 1)
    (tmp / STATE_FILE).write_text(text)
    shutil.rmtree(root / name, ignore_errors=True)
    os.replace(tmp, root / name)
    folders = checkpoint_folders(run_dir)
    keep = [f for f in folders if _round_of(f) <= server_round][:KEEP]
    for old in folders:  # later rounds than this one are unreadable checkpoints a resumed run fell back from
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def _sizes(folder: Path) -> dict[str, int]:
    """``{path relative to folder: bytes}`` of every file under ``folder`` (empty if it does not exist)."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def check_client_state(folder: Path, listed: dict[str, int]) -> None:
    """``UnreadableCheckpoint`` naming the first file of the client-state snapshot that is missing or
    not of the size ``state.json`` lists (a resumed run would otherwise start a client from scratch)."""
    for name, size in listed.items():
        path = Path(folder) / "client_state" / name
        try:
            found = path.stat().st_size
        except OSError:
            raise UnreadableCheckpoint(f"{path}: missing from the client-state snapshot") from None
        if found != size:
            raise UnreadableCheckpoint(f"{path}: {found} bytes, the checkpoint recorded {size}")


def read_checkpoint(folder: Path) -> dict:
    """The state saved in ``folder``; ``UnreadableCheckpoint`` (naming the file) when a file is missing,
    truncated or does not match the checksum, or a client-state file listed in ``state.json`` is
    missing or of another size."""
    state_file, tensor_file = Path(folder) / STATE_FILE, Path(folder) / TENSOR_FILE
    try:
        saved = json.loads(state_file.read_text())
        document, checksum = saved["state"], saved["tensors_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        old_format = not state_file.exists() and (Path(folder) / "state.pkl").exists()
        reason = "missing (state.pkl: an older octomil-sim's format, not readable)" if old_format else _reason(err)
        raise UnreadableCheckpoint(f"{state_file}: {reason}") from None
    check_client_state(folder, saved.get("client_state_files", {}))
    try:
        data = tensor_file.read_bytes()
        if hashlib.sha256(data).hexdigest() != checksum:
            raise ValueError("its SHA-256 differs from the one in state.json (truncated or corrupt)")
        return decode(document, load_tensors(data))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise UnreadableCheckpoint(f"{tensor_file}: {_reason(err)}") from None


def _reason(err: Exception) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    if isinstance(err, KeyError):
        return f"{err} is missing"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


# --- the run directory ---------------------------------------------------------------------------
def load_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``run_dir`` that can be read, as ``(folder, state)``; None if the run
    has none. An unreadable newer one is passed over with a warning naming the bad file; if none can
    be read, a ``ConfigError`` (resuming from scratch would silently redo the run)."""
    reasons = []
    for folder in checkpoint_folders(run_dir):
        try:
            state = read_checkpoint(folder)
        except UnreadableCheckpoint as err:
            reasons.append(str(err))
            continue
        if reasons:
            log.warning("cannot read %s; falling back to %s", "; ".join(reasons), folder)
        return folder, state
    if reasons:
        raise ConfigError(f"hydra.run.dir={str(run_dir)!r}: no checkpoint in it can be read ({'; '.join(reasons)}); "
                          f"allowed: a run directory with a readable checkpoint, or another hydra.run.dir (or "
                          f"delete {Path(run_dir) / CHECKPOINT_DIR} to start the run over)")
    return None


def restore_client_state(folder: Path, client_state: Path | None) -> None:
    """Put the client-state store back as it was when ``folder`` was written (empty if it had none)."""
    if client_state is None:
        return
    shutil.rmtree(client_state, ignore_errors=True)
    if (Path(folder) / "client_state").exists():
        _link_tree(Path(folder) / "client_state", Path(client_state))
