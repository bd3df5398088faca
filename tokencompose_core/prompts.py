"""A prompt, as every prompt source gives it (tokencompose_core.sampling.load_prompts)."""

from __future__ import annotations

from dataclasses import dataclass

VISOR = "visor:"  # VISOR's prompt sets, built in code (tokencompose_core.visor): visor:sr2d


@dataclass(frozen=True)
class Prompt:
    prompt_id: int
    text: str
    categories: tuple[str, ...] = ()
    relation: str | None = None  # spatial prompts (VISOR's SR2D): how categories[0] sits relative to [1]
    groups: tuple[str, ...] = ()  # named groups stage 5 also scores apart ("3 objects", "unseen")
