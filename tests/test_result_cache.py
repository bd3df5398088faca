"""Prefect's cache records are data: a planted pickle is refused, never loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
from prefect.serializers import PickleSerializer

from flows.cli import main
from helpers import photo_manifest


class _Planted:
    """Unpickling this writes a file: the proof that a cache hit ran foreign code."""

    def __init__(self, proof: str) -> None:
        self.proof = proof

    def __reduce__(self):
        return (os.system, (f"touch {self.proof}",))


def _records(root: Path) -> list[Path]:
    return sorted(p for p in (root / "_prefect" / "results").iterdir() if p.is_file())


def _serializers(paths: list[Path]) -> dict[Path, str]:
    """The serializer of each task result record (flow results are stored as bare JSON)."""
    records = {path: json.loads(path.read_bytes()) for path in paths}
    return {path: record["metadata"]["serializer"]["type"] for path, record in records.items() if "metadata" in record}


def test_result_records_are_json_and_a_planted_pickle_is_recomputed_not_loaded(prefect_harness, tmp_path, capsys):
    manifest, root = photo_manifest(tmp_path), tmp_path / "root"
    argv = ["nouns", "-p", "tiny", "--input", manifest, f"storage.root={root}"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    records = _records(root)
    task_records = _serializers(records)
    assert task_records and set(task_records.values()) == {"tokencompose-json"}

    pickled = json.loads(ResultRecord(metadata=ResultRecordMetadata(serializer=PickleSerializer(
        picklelib="cloudpickle")), result=_Planted(str(tmp_path / "pwned"))).serialize())
    # Every kind of serializer field but ours: pickle, none at all (Prefect reads a missing
    # field as pickle), one of Prefect's others, and a malformed one.
    without = {**pickled, "metadata": {k: v for k, v in pickled["metadata"].items() if k != "serializer"}}
    plants = {"pickle": pickled, "missing": without,
              "json": {**pickled, "metadata": {**pickled["metadata"], "serializer": {"type": "json"}}},
              "malformed": {**pickled, "metadata": {**pickled["metadata"], "serializer": "pickle"}}}
    for kind, planted in plants.items():
        for record in records:
            record.write_text(json.dumps(planted))
        assert main(argv) == 0, kind
        again = json.loads(capsys.readouterr().out)
        assert not (tmp_path / "pwned").exists(), f"a cache hit unpickled a planted record ({kind})"
        assert again["nouns_uri"] == first["nouns_uri"]
        # The task ran again and its cache record is data again.
        assert set(_serializers(list(task_records)).values()) == {"tokencompose-json"}, kind
