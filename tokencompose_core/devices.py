"""Where work runs: one rule for every stage that uses a GPU.

A process uses the first device it sees. On a machine with several GPUs each worker
process sees its own GPU first (``CUDA_VISIBLE_DEVICES`` is set for it before CUDA
starts, ``tasks.common.gpu_cluster``), so no stage picks a GPU by shard index and two
workers never share one.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from typing import Any, Callable, Hashable

import torch

AUTO = "auto"


def resolve_device(setting: str) -> torch.device:
    """``auto``: ``cuda`` (the first GPU this process sees) when CUDA is available, else
    ``cpu``; any other setting (``cpu``, ``cuda:1``, ``mps``) as given."""
    if setting == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def placement(device: torch.device | str | None) -> dict[str, Any]:
    """Where a unit of work ran, for its result: the device and the GPUs its process saw
    (``CUDA_VISIBLE_DEVICES``; None when unset, i.e. every GPU of the machine). None for
    a unit that ran nothing (already done)."""
    if device is None:
        return {"device": None, "visible_gpus": None}
    return {"device": str(device), "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}


def gpu_count() -> int:
    """The CUDA devices this process sees. torch counts them without initialising CUDA
    here, and Dask spawns its workers, so each still starts CUDA on its own GPU."""
    return torch.cuda.device_count()


# Held while a model is loaded (by loaded_once).
_LOADING = threading.Lock()


def loaded_once(load: Callable[..., Any], *settings: Hashable) -> Any:
    """``load(*settings)``, once per process: a worker keeps the models of the units it ran
    (a grounder, a detector, Inception, CLIP), so the next shard or samples folder it gets
    reuses them instead of reading the weights again. Callers pass settings as plain values
    (config sections as JSON), which are the key. Threads load one at a time (building a
    model is not thread-safe, :func:`device_turn`), and a second thread asking for the same
    model waits for the first one's."""
    with _LOADING:
        return _loaded(load, *settings)


@lru_cache(maxsize=4)
def _loaded(load: Callable[..., Any], *settings: Hashable) -> Any:
    return load(*settings)


# Held by the unit of work that is using this process's device now.
_DEVICE_TURN = threading.Lock()


def device_turn() -> threading.Lock:
    """The lock units of one process take turns on its device with (``with device_turn():``).
    Two threads gain nothing from one device, and building models is not thread-safe: seeded
    random-init models draw from torch's global generator, and loaders that build on the meta
    device patch torch for the whole process. Units spread over processes (one Dask worker
    per GPU) run at once."""
    return _DEVICE_TURN
