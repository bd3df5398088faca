"""fsspec storage helpers: atomic writes, joins and root checks.

Every artefact the pipeline writes goes through :func:`atomic_write_bytes` (or a
wrapper of it), so a killed process or a failing write leaves either the old
file or the new one, never half of one: data go to a temporary name beside the
target, then a rename (local filesystems) or a single put (object stores, where
an upload becomes visible only when complete) publishes it.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from typing import TYPE_CHECKING, Any

import fsspec
import pandas as pd
from fsspec.core import url_to_fs

if TYPE_CHECKING:
    from tokencompose_core.config import StorageConfig


class StorageError(OSError):
    """A write or read failed; the message says which URI and why."""


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``uri`` and the path inside it."""
    return url_to_fs(uri)


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', refusing parts that would escape ``base``."""
    for part in parts:
        if part in ("", ".", "..") or "\x00" in part or part.startswith("/"):
            raise ValueError(f"unsafe path component {part!r} under {base!r}")
        if any(piece == ".." for piece in part.split("/")):
            raise ValueError(f"unsafe path component {part!r} under {base!r}")
    return posixpath.join(base.rstrip("/"), *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def atomic_write_bytes(uri: str, data: bytes) -> None:
    """Publish ``data`` at ``uri`` all at once or not at all."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path)
    try:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        if is_local(fs):
            temp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(temp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp, path)
            finally:
                if os.path.exists(temp):
                    os.remove(temp)
        else:
            # Object stores and memory:// publish a file only when the put completes.
            fs.pipe_file(path, data)
    except OSError as error:
        raise StorageError(error.errno, f"could not write {uri}: {error.strerror or error}") from error


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def atomic_write_json(uri: str, value: Any) -> None:
    atomic_write_bytes(uri, json.dumps(value, indent=2, sort_keys=True).encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def atomic_write_parquet(frame: pd.DataFrame, uri: str) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(uri, buffer.getvalue())


def read_parquet(uri: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(read_bytes(uri)))


def _real_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` with ``..`` folded and, on local disks, every symlink resolved: a link inside
    a root that points outside it is outside it."""
    return os.path.realpath(path) if is_local(fs) else posixpath.normpath(path)


def _resolved_inside(uri: str, roots: list[str]) -> tuple[bool, str]:
    """Whether ``uri`` lies inside one of ``roots`` (symlinks resolved), and a note saying what it
    resolves to when that differs from what was written."""
    fs, path = filesystem(uri)
    real = _real_path(fs, path)
    for root in roots:
        root_fs, root_path = filesystem(root)
        if root_fs.protocol != fs.protocol:
            continue
        root_path = _real_path(root_fs, root_path)
        if real == root_path or real.startswith(root_path.rstrip("/") + "/"):
            return True, ""
    return False, f" (it resolves to {real})" if real != posixpath.normpath(path) else ""


def check_under_roots(uri: str, roots: list[str]) -> str:
    """Refuse a URI that is not inside one of the configured storage roots (symlinks resolved)."""
    inside, resolved = _resolved_inside(uri, roots)
    if not inside:
        raise ValueError(f"{uri!r} is outside the configured storage roots {roots}{resolved}")
    return uri


def check_root(root: str, allowed_roots: list[str]) -> None:
    """Refuse a ``storage.root`` outside ``storage.allowed_roots`` once they are set (symlinks
    resolved): a run confined to its roots must not write elsewhere either."""
    if not allowed_roots:
        return
    inside, resolved = _resolved_inside(root, allowed_roots)
    if not inside:
        raise ValueError(f"storage.root {root!r} is outside storage.allowed_roots {allowed_roots}{resolved}; "
                         "set storage.root to a folder inside them")


def check_input(uri: str, config: "StorageConfig") -> str:
    """A URI given by a user (flow parameter, config field), checked against the storage roots.

    Once ``storage.allowed_roots`` is set it must lie under one of them (``storage.root``
    does too, :func:`check_root`), so that flow parameters sent through the Prefect API
    or UI cannot read other files. Empty (the default, for local runs) accepts any URI.
    """
    return check_under_roots(uri, config.allowed_roots) if config.allowed_roots else uri


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
