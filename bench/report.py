"""What every benchmark script does with its result: print it as JSON and, with ``--out``, save it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokencompose_core import storage


def emit(result: dict[str, Any], out: Path | str | None) -> dict[str, Any]:
    """Print ``result`` as indented JSON; with ``out``, also write it there atomically (any fsspec URI)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        storage.atomic_write_bytes(str(out), (text + "\n").encode("utf-8"))
    return result
