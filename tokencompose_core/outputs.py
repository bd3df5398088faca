"""Output manifests: proof that a folder of published files is whole.

A folder (a training checkpoint, a stage's output) is published file by file;
each file is atomic, but the set is not, and a file can later be damaged in
place (a bad disk, a copy cut short, a hand edit). :func:`write_manifest`, called
once every file is down, records each file's relative path, size and sha256 in
``_manifest.json``, written last; :func:`verify_manifest` compares the folder
with it and lists what differs. A folder whose check returns no problem holds
exactly the bytes that were written.

Works on any fsspec URI (local paths, object stores, ``memory://``).
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Any, Iterable

from tokencompose_core import storage

MANIFEST_NAME = "_manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 8 * 1024 * 1024  # hash in pieces: checkpoint files are gigabytes


def _sha256(fs: Any, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(fs: Any, root: str) -> list[str]:
    """Relative paths of the files under ``root``, without the manifest or temporary files."""
    found = []
    for path in fs.find(root):
        relative = posixpath.relpath(path, root)
        name = posixpath.basename(relative)
        if relative != MANIFEST_NAME and ".tmp-" not in name:
            found.append(relative)
    return sorted(found)


def write_manifest(folder: str, files: Iterable[str] | None = None) -> str:
    """Record size and sha256 of ``files`` (relative to ``folder``; default: every file
    under it) in ``<folder>/_manifest.json``, published atomically. Call it after the
    last file of the folder is written. Returns the manifest's URI."""
    fs, root = storage.filesystem(folder)
    relative = sorted(files) if files is not None else _files_under(fs, root)
    entries = []
    for name in relative:
        path = storage.join(root, name)
        entries.append({"path": name, "size": int(fs.size(path)), "sha256": _sha256(fs, path)})
    uri = storage.join(folder, MANIFEST_NAME)
    storage.atomic_write_json(uri, {"version": MANIFEST_VERSION, "files": entries})
    return uri


def has_manifest(folder: str) -> bool:
    """Whether ``folder`` has a manifest (folders written before manifests existed have none)."""
    return storage.exists(storage.join(folder, MANIFEST_NAME))


def verify_manifest(folder: str, deep: bool = True) -> list[str]:
    """Problems that make ``folder`` differ from its manifest; empty when it is whole.

    Each problem is one line naming the file: missing, wrong size, or (with
    ``deep``) different content. ``deep=False`` compares sizes only, for a cheap
    check of large folders on object stores. A missing or unreadable manifest is
    itself a problem. Files not in the manifest are ignored (logs may be added).
    """
    uri = storage.join(folder, MANIFEST_NAME)
    try:
        manifest = storage.read_json(uri)
        entries = manifest["files"]
        checked = [(str(e["path"]), int(e["size"]), str(e["sha256"])) for e in entries]
    except FileNotFoundError:
        return [f"{uri}: missing"]
    except (OSError, ValueError, KeyError, TypeError) as error:  # JSON, UTF-8 or shape errors
        return [f"{uri}: unreadable manifest ({type(error).__name__}: {error})"]
    fs, root = storage.filesystem(folder)
    problems = []
    for name, size, sha256 in checked:
        try:
            path, shown = storage.join(root, name), storage.join(folder, name)
        except ValueError as error:  # a manifest naming '../x' must not make us read outside
            problems.append(f"{uri}: {error}")
            continue
        try:
            actual = int(fs.size(path))
            if actual != size:
                problems.append(f"{shown}: {actual} bytes, the manifest says {size}")
            elif deep and _sha256(fs, path) != sha256:
                problems.append(f"{shown}: content differs from the manifest (sha256)")
        except FileNotFoundError:
            problems.append(f"{shown}: missing")
        except OSError as error:  # unreadable: as unusable as missing
            problems.append(f"{shown}: unreadable ({type(error).__name__}: {error})")
    return problems
