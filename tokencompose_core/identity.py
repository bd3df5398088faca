"""Every hash the project computes: identities of settings, files, folders and seeds.

One module so that the rules are the same everywhere: a value's identity is the
sha256 of its canonical JSON (sorted keys); a URI's (:func:`uri_identity`) is its
content: a file's bytes, a folder's files by relative name and digest, or for a
folder a stage sealed, the digests its record lists. Short forms
(16 hex digits, 64 bits) name folders and cache keys; collisions at that length
need ~4 billion distinct settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
import zlib
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

SHORT = 16  # hex digits of a short identity
# The version of the rules above: part of every stage fingerprint and output folder name.
# Bump it when a rule changes, and every key moves at once (no case kept for old keys).
KEY_SCHEMA = 2

# A stage output's record (files, digests, inputs), its manifest-only variant, and the
# resolved configuration written beside the outputs.
STAGE_RECORD = "_stage.json"
MANIFEST_NAME = "_manifest.json"
RECORD_NAMES = (STAGE_RECORD, MANIFEST_NAME)
CONFIG_NAME = "config.yaml"

# Packages whose versions are recorded beside every stage output.
RECORDED_PACKAGES = ("tokencompose", "torch", "diffusers", "transformers", "accelerate", "prefect",
                     "segment-anything", "groundingdino-py", "spacy", "open_clip_torch", "numpy", "pandas",
                     "pyarrow")


def value_hash(value: Any, length: int = SHORT) -> str:
    """Identity of a JSON-able value (dicts by sorted keys; anything else by ``str``)."""
    payload = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]


def bytes_hash(data: bytes, length: int = SHORT) -> str:
    """Identity of a byte string (a manifest's or a marker file's content)."""
    return hashlib.sha256(data).hexdigest()[:length]


def uri_identity(uri: str) -> str:
    """The identity of what ``uri`` holds; the one rule every cache key and folder name uses.

    - a folder a stage sealed (it holds :data:`STAGE_RECORD`): the digests its record lists
      for its result files, so it is not read again;
    - any other folder: every file's relative path and content digest;
    - a file: its content digest.

    Content digests are memoised per file version (:func:`file_digest`), so multi-gigabyte
    weights are read once per machine, not on every run.
    """
    from tokencompose_core import storage

    fs, path = storage.filesystem(uri)
    if not fs.isdir(path):
        return file_digest(uri)[1][:SHORT]
    record = _stage_record(storage.join(uri, STAGE_RECORD))
    if record is not None:
        files = {entry["path"]: entry["sha256"] for entry in record["files"] if is_result_file(entry["path"])}
    else:
        files = {relative: file_digest(storage.join(uri, relative))[1] for relative in listed_files(uri)}
    return value_hash(files)


def folders_identity(folders: Iterable[Path]) -> str:
    """Identity of several local folders together (a tiny model's architecture folders)."""
    return value_hash({f"{folder.parent.name}/{folder.name}": uri_identity(str(folder)) for folder in folders})


def listed_files(folder: str) -> list[str]:
    """Relative paths of the files under ``folder``: no stage record or manifest, and no
    temporary or hidden files (half-written files and tool state are not content)."""
    from tokencompose_core import storage

    fs, root = storage.filesystem(folder)
    found = []
    for path in fs.find(root):
        relative = posixpath.relpath(path, root)
        hidden = any(part.startswith(".") for part in relative.split("/"))
        if relative not in RECORD_NAMES and ".tmp-" not in posixpath.basename(relative) and not hidden:
            found.append(relative)
    return sorted(found)


def is_result_file(path: str) -> bool:
    """What a folder says about how it was made (its configuration, its timings) is not
    part of what it holds: a repair run rewrites those without changing a result."""
    name = posixpath.basename(path)
    return name != CONFIG_NAME and not (name.startswith("stats") and name.endswith(".json"))


def _stage_record(uri: str) -> dict[str, Any] | None:
    from tokencompose_core import storage

    try:
        record = storage.read_json(uri) if storage.exists(uri) else None
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), list) else None


def seed_from(text: str) -> int:
    """A 63-bit seed that depends only on ``text`` (the first 8 bytes of its sha256)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def component_seed(seed: int, component: str) -> int:
    """The seed of one randomly initialised component of a tiny model (CRC-32 of its name)."""
    return seed * 1_000_003 + zlib.crc32(component.encode())


def file_digest(uri: str) -> tuple[int, str]:
    """(size, sha256 hex) of one file on any filesystem, read in 4 MiB blocks.

    The digest is memoised under the file's version, in this process and, for files of
    1 MiB and more, on this machine (:func:`digest_memo_dir`), so multi-gigabyte weights
    are read once, not on every run. A local file's version is its stat (path, size,
    inode, modification and change times): any write changes the change time, which no
    one can set back, so a rewritten file, whatever its size and modification time, is
    read again. An object store's version is the content tag it keeps per object (ETag,
    MD5, generation); a store that keeps none is read every time.
    """
    from tokencompose_core import storage

    fs, path = storage.filesystem(uri)
    local = storage.is_local(fs)
    before = _local_version(path) if local else _stored_version(fs, path)
    known = before and (_DIGESTS.get(before) or _memo_read(before))
    if known:
        return known
    result = _read_digest(fs, path)
    after = _local_version(path) if local else _stored_version(fs, path)
    # Not written while it was read and, locally, not within the file system's timestamp tick
    # of now: a write in the same tick would leave the same stat (git's "racy clean" case).
    settled = not local or time.time_ns() - os.stat(path).st_ctime_ns > _RACY_NS
    if before and after == before and settled:
        _DIGESTS[before] = result
        _memo_write(before, result)
    return result


def _read_digest(fs: Any, path: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


_DIGESTS: dict[str, tuple[int, str]] = {}
_MEMO_MIN_BYTES = 1 << 20
_RACY_NS = 2_000_000_000  # file times can be as coarse as one second (some network mounts)


def digest_memo_dir() -> Path:
    """Where file digests are memoised on this machine: ``$TOKENCOMPOSE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/tokencompose`` (``~/.cache/tokencompose``), folder ``digests``."""
    base = os.environ.get("TOKENCOMPOSE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tokencompose")
    return Path(base) / "digests"


def _local_version(path: str) -> str:
    info = os.stat(path)
    return "\0".join(map(str, (os.path.realpath(path), info.st_size, info.st_ino, info.st_dev,
                                info.st_mtime_ns, info.st_ctime_ns)))


# Per-object content tags of object stores (s3fs, gcsfs, adlfs): a rewrite changes them.
_CONTENT_TAGS = ("ETag", "etag", "md5Hash", "generation", "VersionId", "version_id")


def _stored_version(fs: Any, path: str) -> str | None:
    info = fs.info(path)
    tags = [f"{name}={info[name]}" for name in _CONTENT_TAGS if info.get(name)]
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return "\0".join([f"{protocol}://{path}", str(info.get("size")), *tags]) if tags else None


def _memo_path(key: str) -> Path:
    return digest_memo_dir() / hashlib.sha256(key.encode()).hexdigest()


def _memo_read(key: str) -> tuple[int, str] | None:
    try:
        size, sha256 = _memo_path(key).read_text().split()
        return int(size), sha256
    except (OSError, ValueError):
        return None


def _memo_write(key: str, result: tuple[int, str]) -> None:
    """Best effort: a read-only or full cache folder only costs a re-read next time."""
    if result[0] < _MEMO_MIN_BYTES:
        return
    path = _memo_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(f"{result[0]} {result[1]}\n")
        os.replace(temporary, path)
    except OSError:
        return


def stable_order_key(text: str) -> str:
    """Sort key that spreads ids evenly and does not depend on their order (SHA-1 hex)."""
    return hashlib.sha1(text.encode()).hexdigest()


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape results (absent ones omitted)."""
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
