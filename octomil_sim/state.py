"""Per-client state (personal models, control variates) kept outside Flower's node contexts.

One interface, two backends (as pfl-research's ``save_state(state, user_id, key)``):
``MemoryStateStore`` for a single process, ``DiskStateStore`` for Ray simulation, where a client's
messages may land on any actor and the driver must hold nothing per client. Thousands of clients
then cost disk, not memory.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch

State = dict[str, torch.Tensor]


class ClientStateStore(ABC):
    """``save(client_id, key, state)`` / ``load(client_id, key)``; ``load`` returns None if absent."""

    @abstractmethod
    def save(self, client_id: int, key: str, state: State) -> None: ...

    @abstractmethod
    def load(self, client_id: int, key: str) -> State | None: ...

    def bind(self, client_id: int, device: torch.device | str | None = None) -> "ClientState":
        return ClientState(self, client_id, device)


class MemoryStateStore(ClientStateStore):
    """A dict in this process: for tests and single-process loops, not for several Ray actors."""

    def __init__(self) -> None:
        self._states: dict[tuple[int, str], State] = {}

    def save(self, client_id: int, key: str, state: State) -> None:
        # on the CPU whatever device the client trains on: thousands of clients' state must not hold GPU memory
        self._states[(client_id, key)] = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def load(self, client_id: int, key: str) -> State | None:
        state = self._states.get((client_id, key))
        return None if state is None else {k: v.clone() for k, v in state.items()}


class DiskStateStore(ClientStateStore):
    """One ``torch.save`` file per (key, client) under ``root``; writes are atomic (temp + rename)
    so a run killed mid-write leaves the previous state intact."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, client_id: int, key: str) -> Path:
        return self.root / key / f"{client_id}.pt"

    def save(self, client_id: int, key: str, state: State) -> None:
        path = self._path(client_id, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
        os.replace(tmp, path)

    def load(self, client_id: int, key: str) -> State | None:
        path = self._path(client_id, key)
        return torch.load(path, weights_only=True) if path.exists() else None


class ClientState:
    """The store seen by one client: ``load(key)`` / ``save(key, state)``. The store keeps tensors on
    the CPU; ``load`` gives them on ``device`` (the client's, e.g. ``cuda``; None: as stored)."""

    def __init__(self, store: ClientStateStore, client_id: int, device: torch.device | str | None = None) -> None:
        self._store, self._client_id = store, client_id
        self.device = None if device is None or torch.device(device).type == "cpu" else torch.device(device)

    def load(self, key: str) -> State | None:
        state = self._store.load(self._client_id, key)
        if state is None or self.device is None:
            return state
        return {k: v.to(self.device) for k, v in state.items()}

    def save(self, key: str, state: State) -> None:
        self._store.save(self._client_id, key, state)


def make_store(backend: str, root: str | Path | None) -> ClientStateStore:
    if backend == "memory":
        return MemoryStateStore()
    if root is None:
        raise ValueError("simulation.state_dir=None: the disk state store needs a directory")
    return DiskStateStore(root)
