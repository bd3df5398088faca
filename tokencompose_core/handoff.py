"""Our samples in the layouts of the suites users know, so their evaluators run unchanged.

* GenEval: ``<out>/<NNNNN>/metadata.jsonl`` (the prompt's line of
  ``evaluation_metadata.jsonl``) and ``<out>/<NNNNN>/samples/<NNNN>.png``, NNNNN being
  the prompt's line number. Sample with ``sample.prompts=geneval:<metadata file>``;
  prompts from another source get metadata built from their categories (one of
  each), which GenEval's object counting reads the same way.
* T2I-CompBench: ``<out>/samples/<prompt>_<NNNNNN>.png``, a running six-digit index
  over all images in prompt order, the prompt text being what its evaluators read
  back from the file name.
"""

from __future__ import annotations

import json
from typing import Any

from tokencompose_core import storage
from tokencompose_core.sampling import GENEVAL, geneval_metadata, load_prompts


def _copy(source: str, target: str) -> None:
    storage.atomic_write_bytes(target, storage.read_bytes(source))


def _sample_settings(samples_uri: str) -> dict[str, Any]:
    return storage.read_json(storage.join(samples_uri, "sample_meta.json"))["sample"]


def export_geneval(samples_uri: str, out_uri: str) -> str:
    """Copy a samples folder into GenEval's layout under ``out_uri``; returns ``out_uri``."""
    index = storage.read_parquet(storage.join(samples_uri, "index.parquet"))
    spec = _sample_settings(samples_uri)["prompts"]
    if spec.startswith(GENEVAL):
        metadata = dict(enumerate(geneval_metadata(spec[len(GENEVAL):])))
    else:
        metadata = {p.prompt_id: {"tag": "tokencompose", "prompt": p.text,
                                  "include": [{"class": c, "count": 1} for c in dict.fromkeys(p.categories)]}
                    for p in load_prompts(spec)}
    for prompt_id, rows in index.groupby("prompt_id"):
        folder = storage.join(out_uri, f"{int(prompt_id):05d}")
        storage.atomic_write_bytes(storage.join(folder, "metadata.jsonl"),
                                   (json.dumps(metadata[int(prompt_id)]) + "\n").encode("utf-8"))
        for row in rows.sort_values("image_index").itertuples(index=False):
            _copy(row.image_uri, storage.join(folder, "samples", f"{int(row.image_index):04d}.png"))
    return out_uri


def compbench_name(prompt: str, number: int) -> str:
    """T2I-CompBench's file name for an image of ``prompt``; a '/' would make a folder."""
    return f"{prompt.strip().replace('/', ' ')}_{number:06d}.png"


def export_t2i_compbench(samples_uri: str, out_uri: str) -> str:
    """Copy a samples folder into T2I-CompBench's ``samples/`` naming; returns the folder."""
    index = storage.read_parquet(storage.join(samples_uri, "index.parquet"))
    folder = storage.join(out_uri, "samples")
    ordered = index.sort_values(["prompt_id", "image_index"]).itertuples(index=False)
    for number, row in enumerate(ordered):
        _copy(row.image_uri, storage.join(folder, compbench_name(str(row.prompt), number)))
    return folder
