"""Stage output folders: named after what made them, with a record written last.

Every stage writes into ``<root>/<stage>/<name>-<key>`` where ``key`` hashes the
stage fingerprint and the identities of its inputs, so a changed setting never
shares a folder with another setting and an unchanged one always finds its own.
Beside the outputs go ``config.yaml`` (the resolved configuration that made
them) and, last, ``_stage.json``: the stage, its fingerprint, its inputs, the
package versions and every output file with its size and sha256. A folder
without that record, or whose files no longer match it, is not a result.
"""

from __future__ import annotations

import posixpath
import time
from typing import Any

from tokencompose_core import storage
from tokencompose_core.config import PipelineConfig, dump_config
from tokencompose_core.identity import SHORT, file_digest, package_versions, value_hash

RECORD = "_stage.json"
CONFIG = "config.yaml"


def output_folder(config: PipelineConfig, stage: str, name: str, key: Any) -> str:
    """``<root>/<stage>/<name>-<hash of key>``: one folder per distinct producer."""
    return storage.join(config.storage.root, stage, f"{name}-{value_hash(key)}")


def _file_entry(uri: str) -> dict[str, Any]:
    size, sha256 = file_digest(uri)
    return {"size": size, "sha256": sha256}


def _listed_files(folder: str) -> list[str]:
    """Every file under ``folder`` except the record itself and hidden temporaries."""
    fs, base = storage.filesystem(folder)
    found = []
    for path in sorted(fs.find(base)):
        relative = posixpath.relpath(path, base)
        if relative == RECORD or any(part.startswith(".") for part in relative.split("/")):
            continue
        found.append(relative)
    return found


def write_record(folder: str, config: PipelineConfig, stage: str, fingerprint: str,
                 inputs: dict[str, Any], files: list[str] | None = None) -> dict[str, Any]:
    """Write ``config.yaml``, then the record of ``files`` (default: all in the folder) last."""
    storage.atomic_write_bytes(storage.join(folder, CONFIG), dump_config(config).encode("utf-8"))
    listed = sorted(set(files if files is not None else _listed_files(folder)) | {CONFIG})
    record = {
        "stage": stage,
        "fingerprint": fingerprint,
        "inputs": inputs,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": package_versions(),
        "files": {name: _file_entry(storage.join(folder, name)) for name in listed},
    }
    storage.atomic_write_json(storage.join(folder, RECORD), record)
    return record


def seal(folder: str, config: PipelineConfig, stage: str, fingerprint: str, inputs: dict[str, Any],
         files: list[str] | None = None) -> dict[str, Any]:
    """The folder's record, written only when missing, damaged or made by other inputs:
    an unchanged output is never republished, so its content identity stays put."""
    record = read_record(folder) if storage.exists(storage.join(folder, RECORD)) else None
    if record and record.get("fingerprint") == fingerprint and record.get("inputs") == inputs and is_whole(folder):
        return record
    return write_record(folder, config, stage, fingerprint, inputs, files)


def read_record(folder: str) -> dict[str, Any] | None:
    uri = storage.join(folder, RECORD)
    return storage.read_json(uri) if storage.exists(uri) else None


def problems(folder: str, deep: bool = False) -> list[str]:
    """What is wrong with a stage output folder: no record, missing or resized files
    (and, with ``deep``, changed contents). Empty when the folder is whole."""
    try:
        record = read_record(folder)
    except (ValueError, UnicodeDecodeError):
        return [f"{storage.join(folder, RECORD)} is not a readable record"]
    if record is None:
        return [f"{folder} has no {RECORD} (never finished)"]
    found = []
    for name, entry in record["files"].items():
        uri = storage.join(folder, name)
        fs, path = storage.filesystem(uri)
        if not fs.exists(path):
            found.append(f"{uri} is missing")
        elif fs.info(path)["size"] != entry["size"]:
            found.append(f"{uri} has {fs.info(path)['size']} bytes, recorded {entry['size']}")
        elif deep and _file_entry(uri)["sha256"] != entry["sha256"]:
            found.append(f"{uri} changed since it was recorded")
    return found


def is_whole(folder: str) -> bool:
    return not problems(folder)


def content_identity(folder: str, prefix: str = "") -> str | None:
    """Identity of the recorded files under ``prefix`` (e.g. ``unet/``) by their digests;
    None when the folder has no record. It moves only when their bytes change."""
    record = read_record(folder)
    if record is None:
        return None
    entries = {name: entry["sha256"] for name, entry in record["files"].items() if name.startswith(prefix)}
    return value_hash(entries, SHORT) if entries else None


def discover(config: PipelineConfig, stage: str, fingerprint: str) -> list[str]:
    """Whole output folders of ``stage`` made with ``fingerprint``, newest first."""
    root = storage.join(config.storage.root, stage)
    fs, path = storage.filesystem(root)
    found = []
    for folder in (fs.ls(path, detail=False) if fs.exists(path) else []):
        uri = storage.join(root, posixpath.basename(folder))
        record = read_record(uri) if fs.isdir(folder) else None
        if record and record.get("fingerprint") == fingerprint and is_whole(uri):
            found.append((record["created"], uri))
    return [uri for _, uri in sorted(found, reverse=True)]


def current(config: PipelineConfig, stage: str) -> str:
    """The newest whole output of ``stage`` made with these settings: a stage's default
    input when run alone. Raises FileNotFoundError naming the command to run first."""
    from tokencompose_core.stages import stage_fingerprint

    found = discover(config, stage, stage_fingerprint(config, stage))
    if not found:
        raise FileNotFoundError(f"no {stage} output for these settings under {storage.join(config.storage.root, stage)}; "
                                f"run `tokencompose {stage}` first or pass --input")
    return found[0]
