"""Output manifests: write_manifest records a folder, verify_manifest names every difference."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tokencompose_core import storage
from tokencompose_core.outputs import MANIFEST_NAME, has_manifest, verify_manifest, write_manifest


@pytest.fixture(params=["local", "memory"])
def folder(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    root = str(tmp_path / "out") if request.param == "local" else f"memory://outputs-{uuid.uuid4().hex}"
    storage.atomic_write_bytes(storage.join(root, "a.bin"), b"0123456789")
    storage.atomic_write_bytes(storage.join(root, "sub", "b.json"), b"{}")
    return root


def test_a_whole_folder_verifies(folder: str) -> None:
    assert not has_manifest(folder)
    assert verify_manifest(folder) == [f"{storage.join(folder, MANIFEST_NAME)}: missing"]
    write_manifest(folder)
    assert has_manifest(folder)
    listed = [entry["path"] for entry in storage.read_json(storage.join(folder, MANIFEST_NAME))["files"]]
    assert listed == ["a.bin", "sub/b.json"]
    assert verify_manifest(folder) == [] and verify_manifest(folder, deep=False) == []
    storage.atomic_write_bytes(storage.join(folder, "later.log"), b"x")  # files added later are not checked
    assert verify_manifest(folder) == []


def test_every_difference_is_named(folder: str) -> None:
    write_manifest(folder)
    storage.atomic_write_bytes(storage.join(folder, "a.bin"), b"9123456789")  # same size, other bytes
    assert verify_manifest(folder, deep=False) == []  # sizes only: cheap, blind to same-size damage
    assert verify_manifest(folder) == [f"{storage.join(folder, 'a.bin')}: content differs from the manifest (sha256)"]
    storage.atomic_write_bytes(storage.join(folder, "a.bin"), b"short")
    fs, path = storage.filesystem(storage.join(folder, "sub", "b.json"))
    fs.rm(path)
    assert verify_manifest(folder, deep=False) == [
        f"{storage.join(folder, 'a.bin')}: 5 bytes, the manifest says 10",
        f"{storage.join(folder, 'sub', 'b.json')}: missing",
    ]


def test_only_the_listed_files_and_no_escape(tmp_path: Path) -> None:
    folder = str(tmp_path / "out")
    storage.atomic_write_bytes(storage.join(folder, "kept.bin"), b"k")
    storage.atomic_write_bytes(storage.join(folder, "log.txt"), b"l")
    write_manifest(folder, ["kept.bin"])
    assert [e["path"] for e in storage.read_json(storage.join(folder, MANIFEST_NAME))["files"]] == ["kept.bin"]
    hostile = {"version": 1, "files": [{"path": "../secret", "size": 1, "sha256": "0"}]}
    (tmp_path / "out" / MANIFEST_NAME).write_text(json.dumps(hostile))
    (problem,) = verify_manifest(folder)
    assert "unsafe path component" in problem
    (tmp_path / "out" / MANIFEST_NAME).write_bytes(b"\xff not json")
    (problem,) = verify_manifest(folder)
    assert "unreadable manifest" in problem


def test_sealing_again_notices_a_same_size_rewrite(folder: str) -> None:
    """A repair run may rewrite a file to the same length (new timings, retrained weights
    that are not bit-exact): sealing again must record the new bytes, not keep the old record."""
    from tokencompose_core.config import PipelineConfig
    from tokencompose_core.outputs import problems, seal

    config = PipelineConfig()
    first = seal(folder, config, "sample", "fp", {"in": 1})
    assert seal(folder, config, "sample", "fp", {"in": 1}) == first  # unchanged: not republished
    storage.atomic_write_bytes(storage.join(folder, "a.bin"), b"9123456789")
    assert problems(folder)  # sizes agree; the content does not
    second = seal(folder, config, "sample", "fp", {"in": 1})
    assert second != first and problems(folder) == []


def test_file_digests_are_memoised_per_machine_yet_an_edit_is_read_again(tmp_path, monkeypatch) -> None:
    """Large weights are hashed once, not on every run; an edit, even with its size and
    modification time put back, changes the file's change time and is hashed again."""
    import os
    import time

    from tokencompose_core import identity

    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(bytes(2 << 20))
    monkeypatch.setattr(identity, "_RACY_NS", 0)  # else a file written just now is never memoised
    first = identity.file_digest(str(weights))
    identity._DIGESTS.clear()  # a new process: only the machine's memo is left
    reads: list[str] = []
    read = identity._read_digest
    monkeypatch.setattr(identity, "_read_digest", lambda fs, path: reads.append(path) or (0, "unread"))
    assert identity.file_digest(str(weights)) == first and reads == []
    monkeypatch.setattr(identity, "_read_digest", read)

    before = weights.stat()
    time.sleep(0.05)  # past the file system's timestamp tick (the memo was allowed a fresh file)
    with open(weights, "r+b") as handle:
        handle.write(b"\x01")
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size and weights.stat().st_mtime_ns == before.st_mtime_ns
    assert identity.file_digest(str(weights)) != first


def test_an_object_stores_content_tag_memoises_its_digest(monkeypatch) -> None:
    """On an object store a digest is memoised under the object's content tag (S3's ETag):
    weights on a bucket are not downloaded on every run, and a rewrite is read again."""
    import hashlib

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from tokencompose_core import identity

    class TaggedStore(MemoryFileSystem):
        protocol = "taggedstore"
        store: dict = {}
        pseudo_dirs = [""]

        def info(self, path, **kwargs):
            details = super().info(path, **kwargs)
            if details["type"] == "file":
                details["ETag"] = hashlib.md5(self.cat_file(path)).hexdigest()
            return details

    fsspec.register_implementation("taggedstore", TaggedStore, clobber=True)
    uri = f"taggedstore://bucket/{uuid.uuid4().hex}/weights.safetensors"
    storage.atomic_write_bytes(uri, bytes(2 << 20))
    first = identity.file_digest(uri)
    identity._DIGESTS.clear()  # a new process: only the machine's memo is left
    read = identity._read_digest
    reads: list[str] = []
    monkeypatch.setattr(identity, "_read_digest", lambda fs, path: reads.append(path) or (0, "unread"))
    assert identity.file_digest(uri) == first and reads == []
    monkeypatch.setattr(identity, "_read_digest", read)
    storage.atomic_write_bytes(uri, b"\x01" + bytes((2 << 20) - 1))  # same size, new content tag
    assert identity.file_digest(uri) != first
    # A store without content tags is read every time.
    plain = f"memory://{uuid.uuid4().hex}/weights.safetensors"
    storage.atomic_write_bytes(plain, bytes(2 << 20))
    identity.file_digest(plain)
    monkeypatch.setattr(identity, "_read_digest", lambda fs, path: reads.append(path) or read(fs, path))
    identity.file_digest(plain)
    assert len(reads) == 1
