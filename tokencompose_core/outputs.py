"""Output folders that prove they are whole, and stage outputs named after what made them.

A folder (a training checkpoint, a stage's output) is published file by file;
each file is atomic, but the set is not, and a file can later be damaged in
place (a bad disk, a copy cut short, a hand edit). A **manifest**, written last,
records each file's relative path, size and sha256; :func:`verify_manifest`
lists what differs. A folder whose check returns no problem holds exactly the
bytes that were written. Works on any fsspec URI.

Every **stage output** lives in ``<root>/<stage>/<name>-<key>``, the key hashing
the stage fingerprint and the identities of its inputs, so a changed setting
never shares a folder with another setting and an unchanged one always finds its
own. Beside the outputs go ``config.yaml`` (the resolved configuration that made
them) and, last, the stage record ``_stage.json``: a manifest that also names the
stage, its fingerprint, its inputs and the package versions. A folder without
that record, or whose files no longer match it, is not a result.
"""

from __future__ import annotations

import posixpath
import time
from typing import Any, Iterable

from tokencompose_core import storage
from tokencompose_core.config import PipelineConfig, dump_config
from tokencompose_core import identity
from tokencompose_core.identity import file_digest, package_versions, value_hash

MANIFEST_NAME = identity.MANIFEST_NAME
MANIFEST_VERSION = 1
RECORD = identity.STAGE_RECORD
CONFIG = identity.CONFIG_NAME


# ----------------------------------------------------------------------------- manifests


def write_manifest(folder: str, files: Iterable[str] | None = None, name: str = MANIFEST_NAME,
                   extra: dict[str, Any] | None = None) -> str:
    """Record size and sha256 of ``files`` (relative to ``folder``; default: every file
    under it) in ``<folder>/<name>``, published atomically, with ``extra`` keys beside
    them. Call it after the last file of the folder is written. Returns its URI."""
    entries = []
    for relative in sorted(files) if files is not None else identity.listed_files(folder):
        size, sha256 = file_digest(storage.join(folder, relative))
        entries.append({"path": relative, "size": size, "sha256": sha256})
    uri = storage.join(folder, name)
    storage.atomic_write_json(uri, {**(extra or {}), "version": MANIFEST_VERSION, "files": entries})
    return uri


def has_manifest(folder: str) -> bool:
    """Whether ``folder`` has a manifest (folders written before manifests existed have none)."""
    return storage.exists(storage.join(folder, MANIFEST_NAME))


def verify_manifest(folder: str, deep: bool = True, name: str = MANIFEST_NAME) -> list[str]:
    """Problems that make ``folder`` differ from its manifest ``name``; empty when it is whole.

    Each problem is one line naming the file: missing, wrong size, or (with
    ``deep``) different content. ``deep=False`` compares sizes only, for a cheap
    check of large folders on object stores. A missing or unreadable manifest is
    itself a problem. Files not in the manifest are ignored (logs may be added).
    """
    return [problem for problem, _ in _differences(folder, deep, name)]


def _differences(folder: str, deep: bool, name: str) -> list[tuple[str, str | None]]:
    """(problem, relative path of a recorded file that is there but differs, else None)."""
    uri = storage.join(folder, name)
    try:
        manifest = storage.read_json(uri)
        checked = [(str(e["path"]), int(e["size"]), str(e["sha256"])) for e in manifest["files"]]
    except FileNotFoundError:
        return [(f"{uri}: missing", None)]
    except (OSError, ValueError, KeyError, TypeError) as error:  # JSON, UTF-8 or shape errors
        return [(f"{uri}: unreadable manifest ({type(error).__name__}: {error})", None)]
    fs, root = storage.filesystem(folder)
    found = []
    for relative, size, sha256 in checked:
        try:
            path, shown = storage.join(root, relative), storage.join(folder, relative)
        except ValueError as error:  # a manifest naming '../x' must not make us read outside
            found.append((f"{uri}: {error}", None))
            continue
        try:
            actual = int(fs.size(path))
            if actual != size:
                found.append((f"{shown}: {actual} bytes, the manifest says {size}", relative))
            elif deep and file_digest(shown)[1] != sha256:
                found.append((f"{shown}: content differs from the manifest (sha256)", relative))
        except FileNotFoundError:
            found.append((f"{shown}: missing", None))
        except OSError as error:  # unreadable: as unusable as missing
            found.append((f"{shown}: unreadable ({type(error).__name__}: {error})", relative))
    return found


# ----------------------------------------------------------------------------- stage outputs


def output_folder(config: PipelineConfig, stage: str, name: str, key: Any = None) -> str:
    """``<root>/<stage>/<name>-<hash of key>``: one folder per distinct producer. The only
    function that names an output folder; ``key=None`` keeps ``name`` as given (a run the
    user named, ``train.run_name``)."""
    folder = name if key is None else f"{name}-{value_hash([identity.KEY_SCHEMA, key])}"
    return storage.join(config.storage.root, stage, folder)


def write_record(folder: str, config: PipelineConfig, stage: str, fingerprint: str,
                 inputs: dict[str, Any], files: list[str] | None = None) -> dict[str, Any]:
    """Write ``config.yaml``, then the stage record of ``files`` (default: all in the folder) last."""
    storage.atomic_write_bytes(storage.join(folder, CONFIG), dump_config(config).encode("utf-8"))
    listed = None if files is None else sorted(set(files) | {CONFIG})
    extra = {"stage": stage, "fingerprint": fingerprint, "inputs": inputs,
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": package_versions()}
    return storage.read_json(write_manifest(folder, listed, RECORD, extra))


def seal(folder: str, config: PipelineConfig, stage: str, fingerprint: str, inputs: dict[str, Any],
         files: list[str] | None = None) -> dict[str, Any]:
    """The folder's record, written only when missing, made by other inputs, or no longer
    matching the files (the stage's tasks rewrote some): an unchanged output is never
    republished, so its content identity stays put.

    Call it after :func:`keep_if_whole` and the stage's tasks: every recorded file that
    differed from the record was removed before the tasks ran, so what is recorded here
    is what they wrote, never damage.
    """
    record = read_record(folder)
    unchanged = (record and record.get("fingerprint") == fingerprint and record.get("inputs") == inputs
                 and is_whole(folder))
    return record if unchanged else write_record(folder, config, stage, fingerprint, inputs, files)


def keep_if_whole(folder: str) -> bool:
    """True when ``folder`` matches its record to the byte; else False, after removing every
    recorded file whose size or content differs from the record.

    A cache hit must not serve a damaged output, and a rerun must not adopt one: the
    stage's tasks are forced to run (``recompute_unless``) and find those files missing,
    so they write them anew, and :func:`seal` records only their writes.
    """
    differences = _differences(folder, True, RECORD)
    fs, root = storage.filesystem(folder)
    for _, relative in differences:
        if relative is not None:
            try:
                fs.rm(storage.join(root, relative))
            except FileNotFoundError:  # removed meanwhile (another run repairing it): just as good
                pass
    return not differences


def read_record(folder: str) -> dict[str, Any] | None:
    """The stage record of ``folder``; None when it has none or it is unreadable."""
    uri = storage.join(folder, RECORD)
    try:
        return storage.read_json(uri) if storage.exists(uri) else None
    except (ValueError, UnicodeDecodeError):
        return None


def problems(folder: str) -> list[str]:
    """What is wrong with a stage output folder: no record, missing, resized or changed
    files (digests of unchanged local files are memoised: see ``identity.file_digest``).
    Empty when the folder is whole."""
    return verify_manifest(folder, True, RECORD)


def is_whole(folder: str) -> bool:
    return not problems(folder)


def finished(config: PipelineConfig, stage: str) -> list[tuple[dict[str, Any], str]]:
    """(record, URI) of every whole output folder of ``stage`` under the storage root, by name."""
    root = storage.join(config.storage.root, stage)
    fs, path = storage.filesystem(root)
    found = []
    for folder in sorted(fs.ls(path, detail=False) if fs.exists(path) else []):
        uri = storage.join(root, posixpath.basename(folder))
        record = read_record(uri) if fs.isdir(folder) else None
        if record and is_whole(uri):
            found.append((record, uri))
    return found


def discover(config: PipelineConfig, stage: str, fingerprint: str) -> list[str]:
    """Whole output folders of ``stage`` made with ``fingerprint``, newest first."""
    made = [(record["created"], uri) for record, uri in finished(config, stage) if record.get("fingerprint") == fingerprint]
    return [uri for _, uri in sorted(made, reverse=True)]


def current(config: PipelineConfig, stage: str) -> str:
    """The newest whole output of ``stage`` made with these settings: a stage's default
    input when run alone. Raises FileNotFoundError naming the command to run first."""
    from tokencompose_core.stages import stage_fingerprint

    found = discover(config, stage, stage_fingerprint(config, stage))
    if not found:
        raise FileNotFoundError(f"no {stage} output for these settings under {storage.join(config.storage.root, stage)}; "
                                f"run `tokencompose {stage}` first or pass --input")
    return found[0]
