"""FID and CLIP score of sampled images, as the paper's Table 1 reports them.

FID: Inception-v3 pool3 features (:mod:`tokencompose_core.models.scorers`) and the
Fréchet distance of torchmetrics' ``FrechetInceptionDistance`` (a well-kept, tested
implementation that takes a custom feature module, so the weights come from the
user's file and never from a download). The reference set's statistics are
torchmetrics' own accumulated states, computed once per image set and network and
kept in a folder of their own (``<root>/fid/<manifest>-<key>``), so every run scored
against COCO val reads them instead of re-encoding 10k images. The reference set is
read as stages 1-2 read images: a row whose path is refused, or whose image does not
decode within the size budget, is skipped and named in ``reference.json`` and in
every ``fid.json`` measured against it; fewer than 2 usable images is an error.

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
from tokencompose_core.evaluation import MAX_IMAGE_PIXELS, read_image
from tokencompose_core.manifest import ImageError, ImagePaths, decode_image, read_manifest
from tokencompose_core.models.scorers import INCEPTION_SIDE

REFERENCE_STATS = "reference_stats.safetensors"
# What the reference set was read from, how many images it used and each one it skipped, with why.
REFERENCE_RECORD = "reference.json"
# torchmetrics' FID states for the reference set; ``persistent(True)`` puts them in its state_dict.
_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def _uint8_batches(images: Iterable[Image.Image], batch_size: int, side: int) -> Iterator[torch.Tensor]:
    """Images as uint8 (N, 3, side, side) batches, each resized with PIL's bicubic filter
    (antialiased, the same for reference and samples whatever their sizes)."""
    batch: list[np.ndarray] = []
    for image in images:
        batch.append(np.asarray(image.resize((side, side), Image.BICUBIC)))
        if len(batch) == batch_size:
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
            batch = []
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)


def fid_metric(inception: torch.nn.Module, device: torch.device | str = "cpu") -> Any:
    """torchmetrics' FID over our Inception, on ``device``; the reference states survive ``reset``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=inception, reset_real_features=False, normalize=False)
    metric.persistent(True)
    return metric.to(device)


def reference_images(manifest_uri: str, accepted_uri: str | None = None,
                     paths: ImagePaths | None = None) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(image id, URI) of a reference set's rows in order, and the rows refused for their path.

    ``accepted_uri``: stage 1's nouns table when the set is the manifest stage 1 read, so
    that only the rows stage 1 accepted are read. Otherwise the manifest's rows, each
    path checked by ``paths`` as stage 1 checks it.
    """
    if accepted_uri:
        table = storage.read_parquet(accepted_uri).drop_duplicates("image_id")
        return list(zip(table["image_id"], table["image_uri"])), []
    frame = read_manifest(manifest_uri, paths)
    refused = frame["path_problem"].notna()
    rejects = [_reject(row.id, row.image, row.path_problem) for row in frame[refused].itertuples(index=False)]
    return list(zip(frame.loc[~refused, "id"], frame.loc[~refused, "image"])), rejects


def _reject(image_id: str, uri: str, reason: str) -> dict[str, str]:
    return {"image_id": image_id, "image_uri": uri, "reason": reason}


def _usable_images(candidates: list[tuple[str, str]], limit: int | None, max_pixels: int,
                   rejects: list[dict[str, str]]) -> Iterator[Image.Image]:
    """The first ``limit`` candidates that decode within ``max_pixels`` (stage 2's decoding); each
    that does not is appended to ``rejects`` with its reason and skipped."""
    used = 0
    for image_id, uri in candidates:
        if limit and used == limit:
            return
        try:
            image = decode_image(uri, max_pixels).image
        except ImageError as error:
            rejects.append(_reject(image_id, uri, str(error)))
            continue
        used += 1
        yield image


def named_rejects(rejects: list[dict[str, str]], shown: int = 3) -> str:
    """The first ``shown`` skipped reference images with their reasons, on one line."""
    named = "; ".join(f"{row['image_uri']}: {row['reason']}" for row in rejects[:shown])
    return named + (f" (and {len(rejects) - shown} more)" if len(rejects) > shown else "")


def _too_few(manifest_uri: str, used: int, rejects: list[dict[str, str]]) -> str:
    skipped = f", {len(rejects)} rejected: {named_rejects(rejects)}" if rejects else ""
    return f"FID needs at least 2 reference images; {manifest_uri} has {used} usable{skipped}"


@torch.no_grad()
def reference_statistics(manifest_uri: str, limit: int | None, inception: torch.nn.Module, out_uri: str,
                         batch_size: int, accepted_uri: str | None = None, paths: ImagePaths | None = None,
                         max_pixels: int = MAX_IMAGE_PIXELS, device: torch.device | str = "cpu") -> str:
    """Accumulate the Inception statistics of the first ``limit`` usable reference images on
    ``device`` -> reference_stats.safetensors URI, with ``reference.json`` (the images skipped, and why)."""
    from safetensors.torch import save

    candidates, rejects = reference_images(manifest_uri, accepted_uri, paths)
    metric, used = fid_metric(inception, device), 0
    for batch in _uint8_batches(_usable_images(candidates, limit, max_pixels, rejects), batch_size, INCEPTION_SIDE):
        metric.update(batch.to(device), real=True)
        used += len(batch)
    if used < 2:
        raise ValueError(_too_few(manifest_uri, used, rejects))
    storage.atomic_write_json(storage.join(out_uri, REFERENCE_RECORD), {
        "manifest": manifest_uri, "accepted": accepted_uri, "images": used, "rejects": rejects})
    states = {name: tensor.detach().cpu().contiguous() for name, tensor in metric.state_dict().items()
              if name in _REAL_STATES}
    uri = storage.join(out_uri, REFERENCE_STATS)
    storage.atomic_write_bytes(uri, save(states, metadata={"manifest": manifest_uri, "images": str(used)}))
    return uri


@torch.no_grad()
def fid_score(index_uri: str, stats_uri: str, inception: torch.nn.Module, out_uri: str, batch_size: int,
              device: torch.device | str = "cpu") -> str:
    """FID of a samples folder's images against cached reference statistics, on ``device`` -> fid.json URI."""
    from safetensors.torch import load

    states = load(storage.read_bytes(stats_uri))
    reference = storage.read_json(storage.join(posixpath.dirname(stats_uri), REFERENCE_RECORD))
    index = storage.read_parquet(index_uri)
    record = {"fid": None, "images": int(len(index)), "reference_images": int(states["real_features_num_samples"]),
              "reference": stats_uri, "reference_rejects": reference["rejects"]}
    if len(index) < 2:
        # One image has no covariance: the report shows no FID rather than failing the stage.
        record["note"] = "FID needs at least 2 sampled images"
    else:
        metric = fid_metric(inception, device)
        metric.load_state_dict(states, strict=False)
        for batch in _uint8_batches(map(read_image, index["image_uri"]), batch_size, INCEPTION_SIDE):
            metric.update(batch.to(device), real=False)
        record["fid"] = float(metric.compute())
    uri = storage.join(out_uri, "fid.json")
    storage.atomic_write_json(uri, record)
    return uri


@torch.no_grad()
def clip_scores(index_uri: str, model: Any, processor: Any, batch_size: int,
                device: torch.device | str = "cpu") -> pd.DataFrame:
    """Per image: (prompt_id, image_index, clip_score) with 100 x max(cos, 0); ``model`` on ``device``."""
    index = storage.read_parquet(index_uri)
    rows = []
    records = index.to_dict("records")
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        images = [read_image(r["image_uri"]) for r in batch]
        inputs = processor(text=[r["prompt"] for r in batch], images=images, return_tensors="pt",
                           padding=True, truncation=True).to(device)
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
