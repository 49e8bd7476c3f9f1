"""Checkpoints of a run, so that a killed run resumes to the same numbers it would have reached.

Every ``simulation.checkpoint_every`` rounds the ServerApp writes ``<run dir>/checkpoint/round_<r>/``:
``state.pkl`` (the global arrays, the strategy's state, the per-round records so far, the grid's
counters and the config) and ``client_state/``, a snapshot of the disk client-state store made of
hard links (the store replaces files atomically, so a snapshot never changes after it is taken and
costs no copy). ``LATEST`` names the newest complete checkpoint; it is written last, atomically.

Resuming (the same command with ``hydra.run.dir`` set to the run's directory) restores the store from
the snapshot, so client updates made after the checkpoint are discarded, and goes on from the next
round; rounds seed sampling and SGD, so the result equals an uninterrupted run's.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

CHECKPOINT_DIR = "checkpoint"


def _link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=os.link)


def save_checkpoint(run_dir: Path, server_round: int, state: dict, client_state: Path | None) -> Path:
    """Write the checkpoint of ``server_round``; older ones are removed once it is complete."""
    root = Path(run_dir) / CHECKPOINT_DIR
    name = f"round_{server_round:06d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "state.pkl").write_bytes(pickle.dumps(state))
    if client_state is not None and Path(client_state).exists():
        _link_tree(Path(client_state), tmp / "client_state")
    shutil.rmtree(root / name, ignore_errors=True)
    os.replace(tmp, root / name)
    latest = root / "LATEST.tmp"
    latest.write_text(name)
    os.replace(latest, root / "LATEST")
    for old in root.glob("round_*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def _latest(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint's folder and state, or None if the run has none."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not (root / "LATEST").exists():
        return None
    folder = root / (root / "LATEST").read_text().strip()
    return folder, pickle.loads((folder / "state.pkl").read_bytes())


def load_checkpoint(run_dir: Path, client_state: Path | None) -> dict | None:
    """The newest checkpoint's state, with the client-state store put back as it was then; None if
    the run has none."""
    if (latest := _latest(run_dir)) is None:
        return None
    folder, state = latest
    if client_state is not None:
        shutil.rmtree(client_state, ignore_errors=True)
        if (folder / "client_state").exists():
            _link_tree(folder / "client_state", Path(client_state))
    return state


def checkpoint_config(run_dir: Path) -> dict | None:
    """The config of the run directory's newest checkpoint, or None."""
    latest = _latest(run_dir)
    return None if latest is None else latest[1]["config"]
