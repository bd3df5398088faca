"""Pinning torch's thread count for one piece of work (``<stage>.torch_threads``)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """Run with exactly ``threads`` torch threads (None: leave torch's setting). The thread count
    decides the order of float reductions, so pinning it makes a result independent of the
    machine's cores."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
