"""FID and CLIP score of sampled images, as the paper's Table 1 reports them.

FID: Inception-v3 pool3 features (:mod:`tokencompose_core.models.scorers`) and the
Fréchet distance of torchmetrics' ``FrechetInceptionDistance`` (a well-kept, tested
implementation that takes a custom feature module, so the weights come from the
user's file and never from a download). The reference set's statistics are
torchmetrics' own accumulated states, computed once per image set and network and
kept in a folder of their own (``<root>/fid/<manifest>-<key>``), so every run scored
against COCO val reads them instead of re-encoding 10k images.

CLIP score: 100 x max(cos(image, prompt), 0) per image (the definition torchmetrics'
``CLIPScore`` uses), averaged; the paper uses ViT-L/14.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from tokencompose_core import storage
from tokencompose_core.evaluation import read_image
from tokencompose_core.manifest import read_manifest
from tokencompose_core.models.scorers import INCEPTION_SIDE

REFERENCE_STATS = "reference_stats.safetensors"
# torchmetrics' FID states for the reference set; ``persistent(True)`` puts them in its state_dict.
_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def _uint8_batches(uris: Iterable[str], batch_size: int, side: int) -> Iterator[torch.Tensor]:
    """Images as uint8 (N, 3, side, side) batches, each resized with PIL's bicubic filter
    (antialiased, the same for reference and samples whatever their sizes)."""
    batch: list[np.ndarray] = []
    for uri in uris:
        batch.append(np.asarray(read_image(uri).resize((side, side), Image.BICUBIC)))
        if len(batch) == batch_size:
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
            batch = []
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)


def fid_metric(inception: torch.nn.Module) -> Any:
    """torchmetrics' FID over our Inception; the reference states survive ``reset``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=inception, reset_real_features=False, normalize=False)
    metric.persistent(True)
    return metric


def reference_images(manifest_uri: str, limit: int | None) -> list[str]:
    """The first ``limit`` images of a manifest (COCO val, Flickr30k, the input manifest)."""
    images = read_manifest(manifest_uri)["image"].tolist()
    return images[:limit] if limit else images


@torch.no_grad()
def reference_statistics(manifest_uri: str, limit: int | None, inception: torch.nn.Module, out_uri: str,
                         batch_size: int) -> str:
    """Accumulate the reference images' Inception statistics -> reference_stats.safetensors URI."""
    from safetensors.torch import save

    images = reference_images(manifest_uri, limit)
    if len(images) < 2:
        raise ValueError(f"FID needs at least 2 reference images; {manifest_uri} has {len(images)}")
    metric = fid_metric(inception)
    for batch in _uint8_batches(images, batch_size, INCEPTION_SIDE):
        metric.update(batch, real=True)
    states = {name: tensor.detach().cpu().contiguous() for name, tensor in metric.state_dict().items()
              if name in _REAL_STATES}
    uri = storage.join(out_uri, REFERENCE_STATS)
    storage.atomic_write_bytes(uri, save(states, metadata={"manifest": manifest_uri, "images": str(len(images))}))
    return uri


@torch.no_grad()
def fid_score(index_uri: str, stats_uri: str, inception: torch.nn.Module, out_uri: str, batch_size: int) -> str:
    """FID of a samples folder's images against cached reference statistics -> fid.json URI."""
    from safetensors.torch import load

    states = load(storage.read_bytes(stats_uri))
    index = storage.read_parquet(index_uri)
    record = {"fid": None, "images": int(len(index)), "reference_images": int(states["real_features_num_samples"]),
              "reference": stats_uri}
    if len(index) < 2:
        # One image has no covariance: the report shows no FID rather than failing the stage.
        record["note"] = "FID needs at least 2 sampled images"
    else:
        metric = fid_metric(inception)
        metric.load_state_dict(states, strict=False)
        for batch in _uint8_batches(index["image_uri"], batch_size, INCEPTION_SIDE):
            metric.update(batch, real=False)
        record["fid"] = float(metric.compute())
    uri = storage.join(out_uri, "fid.json")
    storage.atomic_write_json(uri, record)
    return uri


@torch.no_grad()
def clip_scores(index_uri: str, model: Any, processor: Any, batch_size: int) -> pd.DataFrame:
    """Per image: (prompt_id, image_index, clip_score) with 100 x max(cos, 0)."""
    index = storage.read_parquet(index_uri)
    rows = []
    records = index.to_dict("records")
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        images = [read_image(r["image_uri"]) for r in batch]
        inputs = processor(text=[r["prompt"] for r in batch], images=images, return_tensors="pt",
                           padding=True, truncation=True)
        out = model(**inputs)
        image = torch.nn.functional.normalize(out.image_embeds, dim=-1)
        text = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        values = (100.0 * (image * text).sum(-1)).clamp_min(0.0).tolist()
        rows += [(r["prompt_id"], r["image_index"], v) for r, v in zip(batch, values)]
    return pd.DataFrame(rows, columns=["prompt_id", "image_index", "clip_score"])


def clip_record(scores: pd.DataFrame, model: str) -> dict[str, Any]:
    """The run's CLIP score (mean, std over images) for clip.json."""
    values = scores["clip_score"].to_numpy(dtype=float)
    return {"clip_score": float(values.mean()), "std": float(values.std()), "images": int(len(values)),
            "model": model}


def reference_name(manifest_uri: str) -> str:
    """A readable folder name for a reference set: its manifest's file stem."""
    return posixpath.splitext(posixpath.basename(manifest_uri.rstrip("/")))[0] or "reference"
