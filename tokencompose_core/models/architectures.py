"""Architecture folders under ``configs/models/``: what tiny and full-size random models are built from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokencompose_core.config import configs_dir

TINY = "tiny"


def arch_dir(name: str) -> Path:
    """The architecture folder ``configs/models/<name>``; FileNotFoundError listing the known ones."""
    path = configs_dir() / "models" / name
    if not path.is_dir():
        known = sorted(p.name for p in (configs_dir() / "models").iterdir() if p.is_dir())
        raise FileNotFoundError(f"no architecture folder {path}; known: {', '.join(known)}")
    return path


def read_config_json(path: Path) -> dict[str, Any]:
    """One JSON config file of an architecture folder."""
    return json.loads(path.read_text(encoding="utf-8"))
