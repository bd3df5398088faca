"""Stage 2, masks: Grounded-SAM masks of each image's nouns into the Parquet mask cache.

Output: ``<root>/masks/masks-<key>/`` (key: the mask settings and everything
upstream); the cache is filled shard by shard (the units), so a larger nouns table
extends it and a killed run resumes at the first uncommitted shard. Given the
reference's ``metadata.jsonl`` instead of a nouns table, the one unit imports the
released masks into ``<root>/masks/reference-<key>/``. Stage 3's default input
(:func:`current_cache`) is the cache made with these settings, else the newest such import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tokencompose_core import outputs, storage
from tokencompose_core.config import PipelineConfig
from tokencompose_core.grounding import ShardPlan, plan_masks, run_mask_shard
from tokencompose_core.identity import uri_identity
from tokencompose_core.manifest import ImagePaths, import_reference, masks_input_kind
from tokencompose_core.models import diffusion_family
from tokencompose_core.models import fingerprint as models_fingerprint
from tokencompose_core.stages import stage_fingerprint

__all__ = ["MasksPlan", "plan", "summary", "run_mask_shard", "import_reference", "current_cache"]

# The fingerprint of an import: this prefix and the metadata's content (no mask setting made it).
REFERENCE_PREFIX = "reference-"


@dataclass(frozen=True)
class MasksPlan:
    source_uri: str  # the nouns table, or the reference's metadata.jsonl
    source_identity: str
    fingerprint: str
    out_uri: str
    whole: bool
    shards: list[ShardPlan]  # empty for a reference import (one unit)
    reference: bool

    @property
    def inputs(self) -> dict[str, Any]:
        if self.reference:
            return {"metadata": self.source_uri, "metadata_digest": self.source_identity}
        return {"nouns": self.source_uri, "nouns_digest": self.source_identity}


def plan(config: PipelineConfig, input_uri: str | None) -> MasksPlan:
    """``input_uri``: the nouns table (default: stage 1's output for these settings), or the
    reference's ``metadata.jsonl`` (+ mask PNGs beside it)."""
    source = input_uri or storage.join(outputs.current(config, "nouns"), "nouns.parquet")
    storage.check_input(source, config.storage)
    identity = uri_identity(source)
    if masks_input_kind(source) == "reference":
        fingerprint = f"{REFERENCE_PREFIX}{identity}"
        key = [fingerprint, config.masks.shard_size, asdict(reference_paths(config))]
        if diffusion_family(config.models) is not None:
            key.append(models_fingerprint(config.models))  # an MMDiT's own tokenizers place the nouns
        out_uri = outputs.output_folder(config, "masks", "reference", key)
        return MasksPlan(source, identity, fingerprint, out_uri, outputs.keep_if_whole(out_uri), [], True)
    fingerprint = stage_fingerprint(config, "masks")
    out_uri = outputs.output_folder(config, "masks", "masks", fingerprint)
    whole = outputs.keep_if_whole(out_uri)  # a damaged shard is removed, so its unit runs again
    shards = plan_masks(source, out_uri, config.masks.shard_size, fingerprint)
    return MasksPlan(source, identity, fingerprint, out_uri, whole, shards, False)


def current_cache(config: PipelineConfig) -> str:
    """The mask cache stage 3 trains on by default: the newest one made with these settings,
    else the newest import of the authors' released data (``tokencompose masks --input
    metadata.jsonl``), whose key holds no mask setting since no detector made it."""
    found = outputs.discover(config, "masks", stage_fingerprint(config, "masks"))
    if found:
        return found[0]
    imports = sorted((record["created"], uri) for record, uri in outputs.finished(config, "masks")
                     if str(record.get("fingerprint", "")).startswith(REFERENCE_PREFIX))
    if imports:
        return imports[-1][1]
    root = storage.join(config.storage.root, "masks")
    raise FileNotFoundError(f"no masks output for these settings and no import of the authors' data under {root}; "
                            "run `tokencompose masks` first (--input metadata.jsonl imports theirs) or pass --input")


def reference_paths(config: PipelineConfig) -> ImagePaths:
    """Which image and mask paths a reference import may read: a manifest's rules."""
    return ImagePaths.from_config(config.nouns, config.storage.allowed_roots)


def seal(config: PipelineConfig, plan: MasksPlan, results: list[dict[str, Any]]) -> None:
    outputs.seal(plan.out_uri, config, "masks", plan.fingerprint, plan.inputs)


def summary(plan: MasksPlan, results: list[dict[str, Any]]) -> dict[str, Any]:
    if plan.reference:
        (result,) = results
        return {"metadata_uri": plan.source_uri, "cache_uri": plan.out_uri, "shards": len(result["shards"]),
                "images": result["images"], "cache_identity": uri_identity(plan.out_uri)}
    return {"nouns_uri": plan.source_uri, "cache_uri": plan.out_uri, "fingerprint": plan.fingerprint,
            "shards": len(results), "shards_skipped": sum(bool(r["skipped"]) for r in results),
            "images": sum(r["images"] for r in results), "rows": sum(r["rows"] for r in results),
            "rejects": sum(r["rejects"] for r in results), "images_per_s": _images_per_s(results),
            "shard_runs": [{key: r[key] for key in ("shard", "device", "visible_gpus", "images_per_s")}
                           for r in results if not r["skipped"]]}


def _images_per_s(results: list[dict[str, Any]]) -> float | None:
    """Images ground per second: shards run in parallel, so the images the shards read over
    the slowest one's time (None when every shard was done already)."""
    ran = [r for r in results if r["images_per_s"]]
    seconds = max((r["seconds"] for r in ran), default=0.0)
    return sum(r["images_per_s"] * r["seconds"] for r in ran) / seconds if seconds else None
