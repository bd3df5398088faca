"""Stage 5: OWLv2 (or OWL-ViT) detection, MultiGen / two-object accuracy scores, attention-map mIoU.

Detections are stored once, with every box above ``store_threshold`` (0.01), in
the schema (prompt_id, image_index, category, score, box); thresholds are applied
when scoring, so they can change without re-detecting. The synthetic demo's
detector writes the same schema and uses the same scoring functions.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from tokencompose_core import storage
from tokencompose_core.conditioning import TextEmbeddings, square_time_ids, unet_kwargs
from tokencompose_core.config import GroundingLayersConfig, ModelsConfig, SampleConfig, ScoreConfig
from tokencompose_core.devices import loaded_once, resolve_device
from tokencompose_core.identity import seed_from
from tokencompose_core.manifest import ImageError, decode_image
from tokencompose_core.sampling import (
    Prompt,
    encode_prompts,
    load_parts,
    png_bytes,
    resolve_dtype,
)

DETECTION_COLUMNS = ["prompt_id", "image_index", "category", "score", "box"]
MAX_K = 5
# Thresholds swept for "mIoU at the best threshold" (maps are min-max normalised per noun).
SWEEP_THRESHOLDS = np.round(np.linspace(0.05, 0.95, 19), 2)
# Decompression-bomb guard for the images stage 5 reads: masks.max_image_pixels' default
# (sampled and mask-cache images are far smaller; the FID reference passes the setting).
MAX_IMAGE_PIXELS = 50_000_000


# ----------------------------------------------------------------------------- detection


def detection_query(category: str) -> str:
    return f"a photo of a {category}"


def read_image(uri: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The RGB image at ``uri``, full size, decoded as stages 1-2 decode (header checked against
    ``max_pixels`` first); an :class:`ImageError` naming the file when it cannot be used."""
    try:
        return decode_image(uri, max_pixels).image
    except ImageError as error:
        message = str(error)  # a rejects row has the URI beside its reason; this error stands alone
        raise ImageError(message if uri in message else f"{uri}: {message}") from error


def detect_owlv2(index_uri: str, prompts: list[Prompt], models: ModelsConfig, out_uri: str,
                 store_threshold: float = 0.01, batch_size: int = 8, device: str = "cpu",
                 backend: str = "torchvision") -> str:
    """Run OWLv2 on every image of a sample index with its prompt's categories as queries;
    writes ``out_uri/detections.parquet`` (one row per kept box) and returns its URI.
    ``backend``: the image processor's (:func:`tokencompose_core.models.load_owlv2`)."""
    model, processor = loaded_once(_owlv2, models.model_dump_json(), str(resolve_device(device)), backend)
    # OWLv2 pads images to a square at the bottom/right: boxes are relative to the padded side.
    return detect_open_vocabulary(index_uri, prompts, model, processor, lambda im: (max(im.size), max(im.size)),
                                  out_uri, store_threshold, batch_size)


def detect_owlvit(index_uri: str, prompts: list[Prompt], models: ModelsConfig, out_uri: str,
                  store_threshold: float = 0.01, batch_size: int = 8, device: str = "cpu") -> str:
    """:func:`detect_owlv2` with OWL-ViT (``models.owlvit``), the detector VISOR scores with."""
    model, processor = loaded_once(_owlvit, models.model_dump_json(), str(resolve_device(device)))
    # OWL-ViT stretches images to its square input: boxes are relative to the image itself.
    return detect_open_vocabulary(index_uri, prompts, model, processor, lambda im: (im.height, im.width),
                                  out_uri, store_threshold, batch_size)


def _owlv2(models_json: str, device: str, backend: str) -> tuple[Any, Any]:
    from tokencompose_core.models import load_owlv2

    return load_owlv2(ModelsConfig.model_validate_json(models_json), device=device, backend=backend)


def _owlvit(models_json: str, device: str) -> tuple[Any, Any]:
    from tokencompose_core.models import load_owlvit

    return load_owlvit(ModelsConfig.model_validate_json(models_json), device=device)


@torch.no_grad()
def detect_open_vocabulary(index_uri: str, prompts: list[Prompt], model: Any, processor: Any,
                           box_frame: Callable[[Image.Image], tuple[int, int]], out_uri: str,
                           store_threshold: float, batch_size: int) -> str:
    """An OWL-family ``model`` on every image of a sample index, its prompt's categories as
    queries (one label per box: its best query); ``box_frame(image)`` is the (height, width)
    the model's relative boxes are scaled to. -> ``out_uri/detections.parquet`` URI."""
    index = storage.read_parquet(index_uri)
    by_id = {p.prompt_id: p for p in prompts}
    missing = sorted(set(index["prompt_id"]) - set(by_id))
    if missing:
        raise ValueError(f"index {index_uri} has prompt ids without a prompt: {missing[:5]}")
    torch_device = next(model.parameters()).device
    rows: list[tuple] = []
    # A prompt without categories (a caption file, e.g. FID's prompts) gives the detector nothing to
    # look for: its images have no detections, and its set reports no MG_k (reported_ks).
    records = [r for r in index.to_dict("records") if by_id[r["prompt_id"]].categories]
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        images = [read_image(r["image_uri"]) for r in batch]
        queries = [[detection_query(c) for c in by_id[r["prompt_id"]].categories] for r in batch]
        inputs = processor(text=queries, images=images, return_tensors="pt").to(torch_device)
        outputs = model(**inputs)
        results = processor.image_processor.post_process_object_detection(
            outputs, threshold=store_threshold, target_sizes=[box_frame(im) for im in images])
        for record, query, result in zip(batch, queries, results):
            categories = by_id[record["prompt_id"]].categories
            for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(),
                                         result["boxes"].tolist()):
                if label < len(query):  # labels past the prompt's own queries are padding
                    rows.append((record["prompt_id"], record["image_index"], categories[label],
                                 float(score), [float(v) for v in box]))
    frame = pd.DataFrame(rows, columns=DETECTION_COLUMNS).astype(
        {"prompt_id": "int64", "image_index": "int64", "score": "float32"})
    uri = storage.join(out_uri, "detections.parquet")
    storage.atomic_write_parquet(frame, uri)
    return uri


# ----------------------------------------------------------------------------- MultiGen


def _categories_found(detections: pd.DataFrame, prompts: list[Prompt], threshold: float,
                      images: pd.DataFrame | None) -> pd.DataFrame:
    """Distinct prompt categories detected above ``threshold`` per (prompt_id, image_index).

    The denominator is ``images`` (prompt_id, image_index), e.g. the sample index; when
    None, every prompt in ``prompts`` at every image index seen in ``detections``.
    Images without detections count as 0 categories.
    """
    if images is None:
        indices = sorted(detections["image_index"].unique())
        if not indices:
            raise ValueError("no detections and no images frame: cannot tell which images exist")
        images = pd.DataFrame([(p.prompt_id, i) for p in prompts for i in indices],
                              columns=["prompt_id", "image_index"])
    images = images[["prompt_id", "image_index"]].drop_duplicates().astype("int64")
    allowed = pd.DataFrame([(p.prompt_id, c.lower()) for p in prompts for c in set(p.categories)],
                           columns=["prompt_id", "category"])
    kept = detections[detections["score"] > threshold][["prompt_id", "image_index", "category"]].copy()
    kept["category"] = kept["category"].str.lower()
    # Inner join with the prompt's own categories drops detections of other categories.
    kept = kept.astype({"prompt_id": "int64", "image_index": "int64"}).merge(allowed, on=["prompt_id", "category"])
    counts = kept.drop_duplicates().groupby(["prompt_id", "image_index"]).size().rename("found")
    found = images.merge(counts.reset_index(), on=["prompt_id", "image_index"], how="left")
    found["found"] = found["found"].fillna(0).astype(int)
    return found


def multigen_scores(detections: pd.DataFrame, prompts: list[Prompt], threshold: float = 0.1,
                    images: pd.DataFrame | None = None) -> pd.DataFrame:
    """MG_k = percent of images with at least k distinct prompt categories detected with
    score > ``threshold``; rows MG1..MG5, columns ``mean`` and ``std`` across image indices
    (each index is the set of every prompt's image at that index; population std, ddof=0).

    ``images`` (prompt_id, image_index) lists the images that exist (pass the sample
    index); without it every prompt is assumed sampled at every image index present in
    ``detections``.
    """
    found = _categories_found(detections, prompts, threshold, images)
    rows = {}
    for k in range(1, MAX_K + 1):
        per_index = found.assign(hit=found["found"] >= k).groupby("image_index")["hit"].mean() * 100.0
        rows[f"MG{k}"] = {"mean": float(per_index.mean()), "std": float(np.std(per_index.to_numpy()))}
    return pd.DataFrame.from_dict(rows, orient="index")[["mean", "std"]]


def two_object_accuracy(detections: pd.DataFrame, prompts: list[Prompt], threshold: float = 0.1,
                        images: pd.DataFrame | None = None) -> dict[str, float]:
    """Two-object accuracy: percent of any two-object prompts' images where both objects are
    detected; mean and std across image indices. Not VISOR's OA, which is pooled over
    SR2D's images and VISOR's detector (:mod:`tokencompose_core.visor`)."""
    pairs = [p for p in prompts if len(set(p.categories)) == 2]
    if not pairs:
        raise ValueError("two-object accuracy needs two-object prompts; none were given")
    ids = {p.prompt_id for p in pairs}
    found = _categories_found(detections[detections["prompt_id"].isin(ids)], pairs, threshold,
                              None if images is None else images[images["prompt_id"].isin(ids)])
    per_index = found.assign(hit=found["found"] >= 2).groupby("image_index")["hit"].mean() * 100.0
    return {"mean": float(per_index.mean()), "std": float(np.std(per_index.to_numpy()))}


def multigen_per_prompt(detections: pd.DataFrame, prompts: list[Prompt], threshold: float, images: pd.DataFrame,
                        prefix: str) -> pd.DataFrame:
    """Per prompt: MG_k (percent of its images with at least k of its categories) for
    k = 1..5 and, for two-object prompts, two-object accuracy; rows (unit, metric, value)
    with unit ``prompt <id>``. The mean over prompts is the run's MG_k when every
    prompt has the same number of images, so paired intervals bootstrap over these."""
    found = _categories_found(detections, prompts, threshold, images)
    pairs = {p.prompt_id for p in prompts if len(set(p.categories)) == 2}
    frames = []
    for k in range(1, MAX_K + 1):
        hits = found.assign(value=(found["found"] >= k) * 100.0).groupby("prompt_id")["value"].mean()
        frames.append(pd.DataFrame({"prompt_id": hits.index, "metric": f"{prefix} MG{k}", "value": hits.to_numpy()}))
        if k == 2 and pairs:
            chosen = hits[hits.index.isin(pairs)]
            frames.append(pd.DataFrame({"prompt_id": chosen.index, "metric": f"{prefix} two-object acc.",
                                        "value": chosen.to_numpy()}))
    table = pd.concat(frames, ignore_index=True)
    return pd.DataFrame({"unit": "prompt " + table["prompt_id"].astype(str), "metric": table["metric"],
                         "value": table["value"].astype(float)})


# ----------------------------------------------------------------------------- segmentation transfer


def noun_maps(group_maps: list[torch.Tensor], token_positions: list[list[int]], size: tuple[int, int]
              ) -> torch.Tensor:
    """One image's per-noun maps (N, H, W) from a group's layers [(heads, HW, T)]:
    mean over layers and heads, sum over the noun's tokens, bilinear to ``size``."""
    attn = torch.stack([m.float().mean(0) for m in group_maps]).mean(0)  # (HW, T)
    side = int(round(attn.shape[0] ** 0.5))
    maps = torch.stack([attn[:, positions].sum(-1) for positions in token_positions])
    maps = maps.reshape(-1, 1, side, side)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Min-max per map to [0, 1], so one threshold means the same for every noun."""
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).reshape(maps.shape)


def iou_at_thresholds(maps: torch.Tensor, masks: torch.Tensor, thresholds: np.ndarray) -> np.ndarray:
    """IoU (N, K) of ``maps > t`` (normalised maps) against boolean ``masks`` for each t."""
    masks = masks.bool().flatten(1)
    out = np.zeros((maps.shape[0], len(thresholds)))
    for k, t in enumerate(thresholds):
        pred = maps.flatten(1) > float(t)
        inter = (pred & masks).sum(1).double()
        union = (pred | masks).sum(1).double()
        # Empty prediction and empty mask agree perfectly.
        out[:, k] = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).numpy()
    return out


def summarise_ious(ious: dict[str, np.ndarray], thresholds: np.ndarray, fixed: float) -> dict[str, Any]:
    """Per group: mIoU at the fixed threshold and at the dataset-wide best one."""
    fixed_k = int(np.argmin(np.abs(thresholds - fixed)))
    summary = {}
    for group, table in ious.items():
        miou = table.mean(0) if len(table) else np.zeros(len(thresholds))
        best = int(np.argmax(miou))
        summary[group] = {"miou_fixed": float(miou[fixed_k] * 100), "fixed_threshold": float(thresholds[fixed_k]),
                          "miou_best": float(miou[best] * 100), "best_threshold": float(thresholds[best]),
                          "nouns": int(len(table))}
    return summary


def _noised_inputs(parts: Any, pixels: torch.Tensor, seeds: list[int], timestep: int) -> torch.Tensor:
    """Clean image -> (latent) -> noise added at ``timestep`` by the model's noise scheduler."""
    x0 = pixels
    if parts.vae is not None:
        x0 = parts.vae.encode(pixels.to(parts.vae.dtype)).latent_dist.mean * parts.latent_scaling
    noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator("cpu").manual_seed(s))
                         for s in seeds]).to(x0.device, x0.dtype)
    t = torch.full((len(seeds),), timestep, dtype=torch.long, device=x0.device)
    return parts.scheduler.add_noise(x0, noise, t)


def _image_seed(image_id: str) -> int:
    return seed_from(image_id)


def _pixels(uri: str, side: int) -> torch.Tensor:
    image = read_image(uri).resize((side, side), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


@torch.no_grad()
def segmentation_miou(score: ScoreConfig, sample: SampleConfig, grounding: GroundingLayersConfig,
                      models: ModelsConfig, model_dir: str, cache_uri: str, image_ids: list[str],
                      unet_dir: str | None = None, overlays_uri: str | None = None,
                      max_overlays: int = 0) -> dict[str, Any]:
    """Attention-map mIoU on mask-cache images: noise each image to
    ``score.segmentation_timestep``, one U-Net forward on its caption, and score each
    noun's cross-attention map per supervised group (``grounding.layers``, as training
    supervises them) and overall (the groups' maps averaged) against its mask at
    ``segmentation_threshold`` and at the best swept threshold; at ``sample``'s resolution
    and precision.

    Returns {"groups": {group: scores}, "overall": scores, "images", "timestep",
    "overlays": [{"title", "uri", "iou"}]} with mIoU in percent.
    """
    from tokencompose_core.attention import AttentionCapture
    from tokencompose_core.mask_cache import MaskCache
    device = resolve_device(score.device)
    parts = load_parts(model_dir, unet_dir, device, resolve_dtype(sample.mixed_precision, device), models)
    side = sample.resolution or parts.sample_size
    groups, supervised = _scored_groups(parts, grounding, side)
    cache = MaskCache(cache_uri)
    mmdit = {"text_only": grounding.text_keys_only} if parts.is_mmdit else {}
    capture = AttentionCapture(parts.denoiser, groups, **mmdit)
    ious: dict[str, list[np.ndarray]] = {name: [] for name in [*groups, "overall"]}
    fixed_k = int(np.argmin(np.abs(SWEEP_THRESHOLDS - score.segmentation_threshold)))
    per_image: dict[str, list[float]] = {}  # image id -> its nouns' IoU (overall maps, fixed threshold), percent
    overlays: list[dict[str, Any]] = []
    try:
        for image_id in image_ids:
            item = cache.get(image_id, size=(side, side))
            if not item.nouns:
                continue
            image_maps = _image_attention(parts, capture, item, side, score.segmentation_timestep, device,
                                          supervised, sample.guidance_scale)
            masks = torch.from_numpy(np.asarray(item.masks)).bool()
            for name, maps in image_maps.items():
                ious[name].append(iou_at_thresholds(maps, masks, SWEEP_THRESHOLDS))
            per_image[image_id] = (ious["overall"][-1][:, fixed_k] * 100).tolist()
            if overlays_uri and len(overlays) < max_overlays:
                overlays += write_overlays(item, image_maps["overall"], overlays_uri,
                                           max_overlays - len(overlays), score.segmentation_threshold)
    finally:
        capture.remove()
    tables = {name: np.concatenate(v) if v else np.zeros((0, len(SWEEP_THRESHOLDS))) for name, v in ious.items()}
    summary = summarise_ious(tables, SWEEP_THRESHOLDS, score.segmentation_threshold)
    overall = summary.pop("overall")
    return {"groups": summary, "overall": overall, "images": len(image_ids),
            "timestep": score.segmentation_timestep, "overlays": overlays, "per_image": per_image}


def _scored_groups(parts: Any, grounding: GroundingLayersConfig, side: int) -> tuple[dict[str, list[str]], list[str]]:
    """The attention groups scored, and those whose average is the overall map (the supervised ones).

    A U-Net: the groups ``grounding.layers`` supervises. An MMDiT: every joint-attention block, one
    group each, so the report shows which blocks ground nouns before one chooses
    ``train.grounding.blocks``; the overall map averages the chosen blocks (every block when none).
    """
    from tokencompose_core.attention import mmdit_blocks, mmdit_groups, supervised_groups

    if parts.is_mmdit:
        groups = mmdit_groups(parts.transformer, mmdit_blocks(parts.transformer))
        return groups, list(grounding.blocks) or list(groups)
    groups = supervised_groups(parts.unet, list(grounding.layers), side // parts.vae_scale_factor)
    if not groups:
        raise ValueError("the model has no supervised cross-attention layers to score")
    return groups, list(groups)


def _denoise_once(parts: Any, pixels: torch.Tensor, seed: int, timestep: int, text: TextEmbeddings,
                  side: int, guidance: float) -> None:
    """One forward pass of the denoiser on the image noised to ``timestep`` (its maps go to the capture).

    An MMDiT's noise level is timestep / 1000 on the flow-matching path, the level the
    transformer's timestep embedding reads as ``timestep``."""
    device, dtype = pixels.device, pixels.dtype
    if not parts.is_mmdit:
        # An fp32 VAE (SDXL's under fp16) hands back fp32 latents: the U-Net takes its own dtype.
        noisy = _noised_inputs(parts, pixels, [seed], timestep).to(dtype)
        t = torch.full((1,), timestep, dtype=torch.long, device=device)
        parts.unet(noisy, t, **unet_kwargs(text, square_time_ids(side, 1)))
        return
    from tokencompose_core.flow_matching import encode_latents, noised, predict_velocity

    x0 = encode_latents(parts, pixels, None)
    noise = torch.randn(x0.shape[1:], generator=torch.Generator("cpu").manual_seed(seed)).to(device)
    level = torch.full((1,), timestep / 1000, device=device)
    predict_velocity(parts, parts.transformer, noised(x0, noise[None], level), level, text, guidance)


def _image_attention(parts: Any, capture: Any, item: Any, side: int, timestep: int, device: torch.device,
                     supervised: list[str], guidance: float) -> dict[str, torch.Tensor]:
    """Normalised per-noun maps (N, side, side) per group, and ``overall``: the supervised groups' average."""
    dtype = next(parts.denoiser.parameters()).dtype
    pixels = _pixels(item.image_uri, side)[None].to(device, dtype)
    text = encode_prompts(parts, [item.caption]).to(device, dtype)
    capture.clear()
    _denoise_once(parts, pixels, _image_seed(item.image_id), timestep, text, side, guidance)
    # Scored against CPU masks: bring the (small) per-noun maps back from the GPU.
    raw = {name: noun_maps([m[0] for m in layer_maps], item.token_positions, (side, side)).cpu()
           for name, layer_maps in capture.maps().items()}
    out = {name: normalise(maps) for name, maps in raw.items()}
    out["overall"] = normalise(torch.stack([raw[name] for name in supervised]).mean(0))
    return out


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, mask: np.ndarray, min_side: int = 128) -> np.ndarray:
    """Three panels side by side: the image, the heat map over it, the mask."""
    from matplotlib import colormaps

    coloured = (colormaps["jet"](heat)[..., :3] * 255).astype(np.float32)
    blended = (0.5 * image.astype(np.float32) + 0.5 * coloured).astype(np.uint8)
    mask_rgb = np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=-1)
    panels = np.concatenate([image, blended, mask_rgb], axis=1)
    scale = max(1, -(-min_side // image.shape[0]))  # nearest upscaling keeps tiny images legible
    return panels.repeat(scale, axis=0).repeat(scale, axis=1)


def write_overlays(item: Any, maps: torch.Tensor, out_uri: str, limit: int,
                   threshold: float) -> list[dict[str, Any]]:
    """Write up to ``limit`` per-noun overlay PNGs of one image; returns their entries."""
    image = np.asarray(read_image(item.image_uri).resize(maps.shape[::-1][:2], Image.BICUBIC))
    entries = []
    for noun, heat, mask in list(zip(item.nouns, maps.cpu().numpy(), np.asarray(item.masks)))[:limit]:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{item.image_id}_{noun}")[:120] + ".png"
        uri = storage.join(out_uri, name)
        storage.atomic_write_bytes(uri, png_bytes(heatmap_overlay(image, heat, mask > 0)))
        iou = iou_at_thresholds(torch.from_numpy(heat)[None], torch.from_numpy(mask > 0)[None],
                                np.array([threshold]))
        entries.append({"title": f"{item.caption} — {noun}", "uri": uri, "iou": float(iou[0, 0] * 100)})
    return entries
