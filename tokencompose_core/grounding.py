"""Grounded-SAM: GroundingDINO boxes for a caption's nouns -> SAM masks per noun.

Per batch of images: one GroundingDINO forward, each image prompted with its own
"noun1 . noun2 . noun3 ." caption. A query is kept when its best token logit is
above ``box_threshold``; its phrase is the decoded text of the tokens above
``text_threshold`` (groundingdino's ``get_phrases_from_posmap``), and the phrase
is matched back to one of the caption's nouns. Then per image: one SAM (or
SAM-HQ) image embedding and ONE batched ``predict_torch`` call for all kept boxes.

Two ways from phrases to nouns (``masks.phrase_matching``):

* ``noun_tokens`` (ours): only the nouns' own tokens can make the phrase (never
  [CLS], [SEP] or the " . " separators); a phrase that ran over several nouns
  goes to the best-scoring one (:func:`match_phrase`); the masks of all boxes of
  a noun are unioned;
* ``reference`` (the paper's data): every token above the threshold is decoded;
  boxes with the same phrase are unioned; each phrase is matched by the
  reference's rules in word-list order (:func:`match_phrase_reference`), and a
  later phrase matched to the same noun replaces the earlier one's mask.

Four more of the reference's deterministic choices are switches (``masks.*``):
the detector's input size truncated as groundingdino's own transform does
(:func:`detector_input_size`), one detector forward per image
(:func:`detector_batches`), boxes passed to SAM unclipped, and images without a
grounded noun left out (:func:`ground_shard`).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from tokencompose_core import mask_cache, storage
from tokencompose_core.devices import placement, resolve_device
from tokencompose_core.identity import bytes_hash

# GroundingDINO's ImageNet normalisation and its 800/1333 short/long side ratio.
_MEAN = [0.485, 0.456, 0.406]
_STD = [0.229, 0.224, 0.225]
_MAX_SIZE_RATIO = 1333 / 800


@dataclass
class Grounding:
    """One noun grounded in one image."""

    noun: str
    mask: np.ndarray  # (H, W) bool, the union of the noun's boxes' masks
    box: list[float]  # x0, y0, x1, y1 pixels: the union of the noun's boxes
    score: float  # the best box score of the noun


@dataclass
class Detection:
    """One kept GroundingDINO query, already matched to a noun."""

    noun: str
    box: list[float]  # x0, y0, x1, y1 pixels
    score: float
    phrase: str = ""  # the decoded tokens above the text threshold


PHRASE_MATCHING = ("noun_tokens", "reference")


def _words(text: str) -> list[str]:
    """Lowercased words, hyphens glued to their neighbours ("t - shirt" -> ["t-shirt"])."""
    return re.sub(r"\s*-\s*", "-", text.lower()).split()


def _contains(outer: list[str], inner: list[str]) -> bool:
    return bool(inner) and any(outer[i : i + len(inner)] == inner for i in range(len(outer) - len(inner) + 1))


def match_phrase(phrase: str, nouns: Sequence[str], noun_scores: Sequence[float] | None = None) -> str | None:
    """The caption noun a predicted phrase stands for, or None.

    Rules in order: exact; ignoring case; ignoring hyphen spacing (BERT decodes
    "t-shirt" as "t - shirt"); sub-phrase (the phrase inside a noun, "glass" for
    "wine glass", or a noun inside the phrase when the tokens above the text
    threshold ran over several nouns). Ties go to the noun with the higher score.
    """
    if phrase in nouns:
        return phrase
    scores = list(noun_scores) if noun_scores is not None else [0.0] * len(nouns)
    phrase_words = _words(phrase)
    noun_words = [_words(noun) for noun in nouns]
    for same in (
        lambda words: words == phrase_words,
        lambda words: _contains(words, phrase_words),
        lambda words: _contains(phrase_words, words),
    ):
        candidates = [i for i, words in enumerate(noun_words) if same(words)]
        if candidates:
            return nouns[max(candidates, key=lambda i: scores[i])]
    return None


def match_phrase_reference(phrase: str, nouns: Sequence[str]) -> str | None:
    """The caption noun a phrase stands for, by the reference's rules, or None.

    Exact; the phrase upper-cased, lower-cased, or with " - " closed up; else the
    first noun that is one of the phrase's words or has the phrase as one of its
    words, overridden by the first noun that contains the phrase or is contained
    in it as a substring; else the first noun containing every word of the phrase.
    """
    for candidate in (phrase, phrase.upper(), phrase.lower(), phrase.replace(" - ", "-")):
        if candidate in nouns:
            return candidate
    low = phrase.lower()
    found = next((n for n in nouns if n.lower() in low.split(" ") or low in n.lower().split(" ")), None)
    found = next((n for n in nouns if n.lower() in low or low in n.lower()), found)
    if found is None:
        found = next((n for n in nouns if all(word.lower() in n.lower() for word in phrase.split(" "))), None)
    return found


def detection_caption(nouns: Sequence[str]) -> str:
    """GroundingDINO's prompt: lowercased nouns separated by " . ", ending in " ."."""
    return " . ".join(noun.lower().strip() for noun in nouns) + " ."


def noun_token_spans(caption: str, nouns: Sequence[str], tokenizer: Any, max_len: int) -> list[range]:
    """Each noun's token positions in the detector's tokenization of ``caption`` ([CLS] at 0)."""
    spans, cursor = [], 0
    for noun in nouns:
        word = noun.lower().strip()
        start = caption.index(word, cursor)
        cursor = start + len(word)
        first = len(tokenizer(caption[:start], add_special_tokens=False)["input_ids"]) + 1
        last = len(tokenizer(caption[:cursor], add_special_tokens=False)["input_ids"]) + 1
        spans.append(range(min(first, max_len), min(last, max_len)))  # beyond the text limit: empty
    return spans


DETECTOR_SIZE_ROUNDING = ("round", "truncate")
DETECTOR_BATCHING = ("batched", "per_image")


def detector_input_size(width: int, height: int, short_side: int, rounding: str = "round") -> tuple[int, int]:
    """(height, width) GroundingDINO sees: short side to ``short_side``, long side at most
    ``short_side`` * 1333/800.

    "round": both sides from one scale, rounded (640x480 -> 1067x800). "truncate": as
    groundingdino's own resize transform (the reference's), which rounds the capped short
    side but truncates the other one (640x480 -> 1066x800).
    """
    if rounding == "round":
        scale = min(short_side / min(width, height), short_side * _MAX_SIZE_RATIO / max(width, height))
        return max(1, round(height * scale)), max(1, round(width * scale))
    if rounding != "truncate":
        raise ValueError(f"unknown detector size rounding {rounding!r}; use one of {DETECTOR_SIZE_ROUNDING}")
    short, long = min(width, height), max(width, height)
    max_size = round(short_side * _MAX_SIZE_RATIO)
    size = int(round(max_size * short / long)) if long / short * short_side > max_size else short_side
    if short == size:
        return height, width
    return (int(size * height / width), size) if width < height else (size, int(size * width / height))


def _resize_for_detector(image: Image.Image, short_side: int, rounding: str = "round") -> torch.Tensor:
    """GroundingDINO's eval transform: resize (:func:`detector_input_size`), normalise."""
    height, width = detector_input_size(*image.size, short_side, rounding)
    tensor = TF.to_tensor(image.resize((width, height), Image.BILINEAR))
    return TF.normalize(tensor, _MEAN, _STD)


def _cxcywh_to_pixels(boxes: torch.Tensor, height: int, width: int, clamp: bool = True) -> torch.Tensor:
    """Normalised centre boxes -> x0, y0, x1, y1 pixels, clipped to the image when ``clamp``
    (the reference passes them to SAM unclipped)."""
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    scale = torch.tensor([width, height, width, height], dtype=xyxy.dtype)
    pixels = xyxy * scale
    return pixels.clamp(min=torch.zeros(4), max=scale) if clamp else pixels


def detector_batches(count: int, batching: str) -> list[range]:
    """Which images share a GroundingDINO forward: all of a batch, or each alone ("per_image",
    the reference, whose images are never padded to another's size)."""
    if batching not in DETECTOR_BATCHING:
        raise ValueError(f"unknown detector batching {batching!r}; use one of {DETECTOR_BATCHING}")
    if batching == "per_image":
        return [range(index, index + 1) for index in range(count)]
    return [range(count)] if count else []


def _union(detections: Sequence[Detection], masks: np.ndarray, indices: list[int]) -> Grounding:
    boxes = np.array([detections[i].box for i in indices])
    box = [float(boxes[:, 0].min()), float(boxes[:, 1].min()), float(boxes[:, 2].max()), float(boxes[:, 3].max())]
    score = max(detections[i].score for i in indices)
    return Grounding(detections[indices[0]].noun, masks[indices].any(axis=0), box, float(score))


def union_by_noun(detections: Sequence[Detection], masks: np.ndarray) -> list[Grounding]:
    """Union the masks (K, H, W) and boxes of detections of the same noun, in first-seen order."""
    grouped: dict[str, list[int]] = {}
    for index, detection in enumerate(detections):
        grouped.setdefault(detection.noun, []).append(index)
    return [_union(detections, masks, indices) for indices in grouped.values()]


def union_by_phrase(detections: Sequence[Detection], masks: np.ndarray) -> list[Grounding]:
    """The reference's aggregation: union per phrase; a later phrase of the same noun replaces an earlier one."""
    grouped: dict[str, list[int]] = {}
    for index, detection in enumerate(detections):
        grouped.setdefault(detection.phrase, []).append(index)
    by_noun: dict[str, Grounding] = {}
    for indices in grouped.values():
        grounding = _union(detections, masks, indices)
        by_noun.pop(grounding.noun, None)  # re-insert: the kept mask is the last phrase's
        by_noun[grounding.noun] = grounding
    return list(by_noun.values())


class GroundedSam:
    """GroundingDINO + SAM, batched; ``__call__(images, nouns)`` -> groundings per image."""

    def __init__(
        self,
        dino: torch.nn.Module,
        sam: torch.nn.Module,
        box_threshold: float = 0.25,
        text_threshold: float = 0.25,
        image_size: int = 800,
        device: str = "cpu",
        mixed_precision: str = "no",
        max_boxes: int | None = None,
        sam_variant: str = "sam",
        phrase_matching: str = "noun_tokens",
        detector_size_rounding: str = "round",
        detector_batching: str = "batched",
        clamp_boxes: bool = True,
        keep_ungrounded_images: bool = True,
    ) -> None:
        from tokencompose_core.models import sam_package

        if phrase_matching not in PHRASE_MATCHING:
            raise ValueError(f"unknown phrase_matching {phrase_matching!r}; use one of {PHRASE_MATCHING}")
        self.dino = dino.eval().to(device)
        self.predictor = sam_package(sam_variant).SamPredictor(sam.eval().to(device))
        self.phrase_matching = phrase_matching
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.image_size = image_size
        self.device = device
        self.mixed_precision = mixed_precision
        self.max_boxes = max_boxes
        detector_input_size(1, 1, 1, detector_size_rounding)  # an unknown value fails here, not mid-shard
        detector_batches(0, detector_batching)
        self.detector_size_rounding = detector_size_rounding
        self.detector_batching = detector_batching
        self.clamp_boxes = clamp_boxes
        # Read by ground_shard: the grounder carries the masks settings to every worker.
        self.keep_ungrounded_images = keep_ungrounded_images
        # The largest image side either model looks at: GroundingDINO caps the long side at
        # image_size * 1333/800, SAM resizes the long side to its encoder's input. Images are
        # decoded no larger (ground_shard), which bounds a batch's pixels whatever the input.
        self.decode_long_side = max(round(image_size * _MAX_SIZE_RATIO), int(sam.image_encoder.img_size))
        # SamPredictor holds the current image: shards grounded from several
        # threads of one process take turns.
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, models: Any, masks: Any, random_weights: bool = False) -> "GroundedSam":
        """Build from a ``ModelsConfig`` and a ``MasksConfig`` (models via ``tokencompose_core.models``)."""
        from tokencompose_core.models import load_grounding_dino, load_sam

        device = str(resolve_device(masks.device))
        options = {"random_weights": True} if random_weights else {}
        return cls(
            load_grounding_dino(models, device=device, **options),
            load_sam(models, device=device, **options),
            box_threshold=masks.box_threshold,
            text_threshold=masks.text_threshold,
            image_size=masks.image_size,
            device=device,
            mixed_precision=masks.mixed_precision,
            max_boxes=masks.max_boxes,
            sam_variant=models.sam.variant,
            phrase_matching=masks.phrase_matching,
            detector_size_rounding=masks.detector_size_rounding,
            detector_batching=masks.detector_batching,
            clamp_boxes=masks.clamp_boxes,
            keep_ungrounded_images=masks.keep_ungrounded_images,
        )

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
        if self.device.startswith("cuda") and self.mixed_precision in dtypes:
            with torch.autocast("cuda", dtype=dtypes[self.mixed_precision]):
                yield
        else:
            yield

    def detect(self, images: Sequence[Image.Image], nouns: Sequence[Sequence[str]]) -> list[list[Detection]]:
        """Kept boxes matched to each image's nouns: one GroundingDINO forward for the batch,
        or one per image (``detector_batching``)."""
        found: list[list[Detection]] = []
        for part in detector_batches(len(images), self.detector_batching):
            found += self._detect([images[i] for i in part], [nouns[i] for i in part])
        return found

    @torch.no_grad()
    def _detect(self, images: Sequence[Image.Image], nouns: Sequence[Sequence[str]]) -> list[list[Detection]]:
        from groundingdino.util.misc import nested_tensor_from_tensor_list

        captions = [detection_caption(image_nouns) for image_nouns in nouns]
        # Images of different sizes are padded to one batch; the padding mask keeps
        # each image's boxes relative to its own (unpadded) size.
        batch = nested_tensor_from_tensor_list(
            [_resize_for_detector(image, self.image_size, self.detector_size_rounding).to(self.device)
             for image in images]
        )
        with self._autocast():
            outputs = self.dino(batch, captions=captions)
        logits = outputs["pred_logits"].float().sigmoid().cpu()  # (B, queries, text_len)
        boxes = outputs["pred_boxes"].float().cpu()  # (B, queries, 4) cx, cy, w, h in [0, 1]
        return [
            self._match(logits[b], boxes[b], captions[b], list(nouns[b]), images[b].size)
            for b in range(len(images))
        ]

    def _match(
        self, logits: torch.Tensor, boxes: torch.Tensor, caption: str, nouns: list[str], size: tuple[int, int]
    ) -> list[Detection]:
        tokenizer = self.dino.tokenizer
        input_ids = tokenizer(caption)["input_ids"][: logits.shape[-1]]
        logits = logits[:, : len(input_ids)]
        best = logits.max(dim=-1).values
        kept = torch.nonzero(best > self.box_threshold).flatten()
        if self.max_boxes is not None:
            kept = kept[best[kept].argsort(descending=True)[: self.max_boxes]]
        spans = noun_token_spans(caption, nouns, tokenizer, len(input_ids))
        # Tokens that can name an object: not [CLS]/[SEP] and not the " . " separators.
        wordy = torch.zeros(len(input_ids), dtype=torch.bool)
        for span in spans:
            wordy[list(span)] = True
        if self.phrase_matching == "reference":  # the reference decodes [CLS], [SEP] and " . " too
            wordy[:] = True
        pixels = _cxcywh_to_pixels(boxes[kept], height=size[1], width=size[0], clamp=self.clamp_boxes)
        detections = []
        for row, query in enumerate(kept.tolist()):
            above = (logits[query] > self.text_threshold) & wordy
            phrase = tokenizer.decode([input_ids[i] for i in torch.nonzero(above).flatten().tolist()])
            if self.phrase_matching == "reference":
                noun = match_phrase_reference(phrase, nouns)
            else:
                scores = [float(logits[query, list(span)].max()) if len(span) else 0.0 for span in spans]
                noun = match_phrase(phrase, nouns, scores)
            if noun is not None:
                detections.append(Detection(noun, pixels[row].tolist(), float(best[query]), phrase))
        return detections

    @torch.no_grad()
    def segment(self, image: Image.Image, detections: Sequence[Detection]) -> list[Grounding]:
        """One SAM embedding of ``image``, one batched mask prediction for all boxes."""
        if not detections:
            return []
        array = np.asarray(image)
        with self._autocast():
            self.predictor.set_image(array)
            boxes = torch.tensor([d.box for d in detections], dtype=torch.float32, device=self.device)
            boxes = self.predictor.transform.apply_boxes_torch(boxes, array.shape[:2])
            masks, _, _ = self.predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)
        self.predictor.reset_image()
        union = union_by_phrase if self.phrase_matching == "reference" else union_by_noun
        return union(detections, masks[:, 0].cpu().numpy())

    def __call__(self, images: Sequence[Image.Image], nouns: Sequence[Sequence[str]]) -> list[list[Grounding]]:
        """Groundings of each image's nouns (nouns without a detection are absent)."""
        with self._lock:
            detections = self.detect(images, nouns)
            return [self.segment(image, found) for image, found in zip(images, detections)]


MASKS_STAGE = "masks"


def shard_inputs_digest(nouns_rows: pd.DataFrame) -> str:
    """Digest of a shard's input rows: a completed shard is reused only for the same inputs."""
    columns = ["image_id", "image_uri", "caption", "noun", "token_positions"]
    return bytes_hash(nouns_rows[columns].to_json(orient="values").encode("utf-8"))


@dataclass
class _ShardImage:
    """One image of a shard on its way through grounding."""

    image_id: str
    image_uri: str
    caption: str
    nouns: list[str]
    positions: dict[str, list[int]]
    size: tuple[int, int] = (0, 0)  # (width, height) of the file: the cache's masks have this size
    image: Image.Image | None = None  # decoded (reduced) while waiting for its batch; None without nouns


def _image_rows(nouns_rows: pd.DataFrame) -> Iterator[_ShardImage]:
    """The shard's images with their nouns and positions, in table order; one at a time, so
    that an image grounded and dropped is no longer referenced."""
    for image_id, group in nouns_rows.groupby("image_id", sort=False):
        named = group[group["noun"].notna()]
        positions = {noun: [int(p) for p in pos] for noun, pos in zip(named["noun"], named["token_positions"])}
        first = group.iloc[0]
        yield _ShardImage(str(image_id), str(first["image_uri"]), str(first["caption"]), list(positions), positions)


def _ground_each(grounder: Callable, batch: list[_ShardImage]) -> list[list[Grounding] | Exception]:
    """Ground a batch; if it fails, each image alone, so that an image the models cannot
    take (a 400 x 1 sliver breaks GroundingDINO and SAM) fails only itself.

    Out of memory is no image's fault: it propagates, and the task retries with a smaller batch.
    """
    try:
        return grounder([item.image for item in batch], [item.nouns for item in batch])
    except Exception as error:  # noqa: BLE001 - the image's reject row carries the error
        if isinstance(error, torch.OutOfMemoryError):
            raise
        if len(batch) == 1:
            return [error]
        return [_ground_each(grounder, [item])[0] for item in batch]


def _to_file_size(grounding: Grounding, decoded: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, list]:
    """Mask and box of an image decoded at ``decoded`` (width, height), at the file's ``size``.

    The mask is scaled up by nearest neighbour: SAM's masks come from 256 x 256 logits,
    so at the decoded size (long side >= SAM's input) they hold all the detail they have.
    """
    if decoded == size:
        return grounding.mask, grounding.box
    mask = Image.fromarray(grounding.mask.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
    sx, sy = size[0] / decoded[0], size[1] / decoded[1]
    x0, y0, x1, y1 = grounding.box
    return np.asarray(mask, dtype=bool), [x0 * sx, y0 * sy, x1 * sx, y1 * sy]


UNGROUNDED_REASON = "no grounded noun: left out (masks.keep_ungrounded_images=false)"


def _ground_chunk(grounder: Callable, chunk: list[_ShardImage], fingerprint: str, rows: list[dict],
                  rejects: list[dict], keep_ungrounded: bool = True) -> None:
    """Ground the images of ``chunk`` that have nouns (one batch) and add every image's rows."""
    batch = [item for item in chunk if item.image is not None]
    grounded: dict[str, list[Grounding]] = {}
    for item, found in zip(batch, _ground_each(grounder, batch) if batch else []):
        if isinstance(found, Exception):
            reason = f"grounding failed: {type(found).__name__}: {found}"
            rejects.append(mask_cache.reject_row(item.image_id, item.image_uri, MASKS_STAGE, reason))
        else:
            grounded[item.image_id] = found
    for item in chunk:
        if item.image is not None and item.image_id not in grounded:  # rejected above
            continue
        decoded = item.image.size if item.image is not None else item.size
        found = {g.noun: g for g in grounded.get(item.image_id, [])}
        width, height = item.size
        head = (item.image_id, item.image_uri, item.caption, height, width, fingerprint)
        for noun in item.nouns:
            if noun not in found:
                rejects.append(mask_cache.reject_row(item.image_id, item.image_uri, MASKS_STAGE,
                                                     "noun without detection", noun))
                continue
            mask, box = _to_file_size(found[noun], decoded, item.size)  # one full-size mask at a time
            rows.append(mask_cache.shard_row(*head, noun, item.positions[noun], mask, box, found[noun].score))
        if not found and keep_ungrounded:
            rows.append(mask_cache.shard_row(*head))
        elif not found:
            rejects.append(mask_cache.reject_row(item.image_id, item.image_uri, MASKS_STAGE, UNGROUNDED_REASON))


def ground_shard(
    nouns_rows: pd.DataFrame,
    grounder: Callable[[Sequence[Image.Image], Sequence[Sequence[str]]], list[list[Grounding]]],
    fingerprint: str,
    batch_size: int,
    max_image_pixels: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Shard rows and rejects for the images of ``nouns_rows`` (a slice of the nouns table).

    Unreadable or too large images, and images the models fail on, are rejected
    and skipped; a noun without a detection is rejected but its image stays (with
    its other nouns, or as the single noun-less row that still trains with the
    denoising loss, unless the grounder's ``keep_ungrounded_images`` is false: then
    the image is rejected, as the reference's data leaves such images out).

    Memory: images are decoded batch by batch, each reduced to the grounder's
    ``decode_long_side`` (when it has one, as :class:`GroundedSam` does), so a
    batch holds at most ``batch_size`` such images whatever the files' sizes; masks
    are scaled back to the file's size one at a time as they are encoded.
    """
    from tokencompose_core.manifest import ImageError, decode_image

    long_side = getattr(grounder, "decode_long_side", None)
    keep_ungrounded = getattr(grounder, "keep_ungrounded_images", True)
    rows: list[dict] = []
    rejects: list[dict] = []
    chunk: list[_ShardImage] = []
    for item in _image_rows(nouns_rows):
        try:
            decoded = decode_image(item.image_uri, max_image_pixels, long_side)
        except ImageError as error:
            rejects.append(mask_cache.reject_row(item.image_id, item.image_uri, MASKS_STAGE, str(error)))
            continue
        item.size = decoded.original_size
        item.image = decoded.image if item.nouns else None  # without nouns only the size is needed
        chunk.append(item)
        if sum(entry.image is not None for entry in chunk) == batch_size:
            _ground_chunk(grounder, chunk, fingerprint, rows, rejects, keep_ungrounded)
            chunk = []  # releases the batch's images before the next is decoded
    _ground_chunk(grounder, chunk, fingerprint, rows, rejects, keep_ungrounded)
    return mask_cache.rows_frame(rows), mask_cache.rejects_frame(rejects)


def _committed_for(cache_uri: str, shard_name: str, record: dict[str, Any], fingerprint: str, inputs: str) -> bool:
    return (record.get("fingerprint") == fingerprint and record.get("inputs") == inputs
            and mask_cache.shard_is_whole(cache_uri, shard_name, record))


@dataclass(frozen=True)
class ShardPlan:
    name: str
    image_ids: list[str]
    inputs_digest: str  # digest of the shard's nouns rows
    committed: bool  # already committed, whole, for these inputs and settings


def plan_masks(nouns_uri: str, cache_uri: str, shard_size: int, fingerprint: str) -> list[ShardPlan]:
    """The shards of a mask cache for this nouns table, and which are already done.

    Shards the table no longer has (an earlier, larger input) are withdrawn from
    the cache here, so the cache always describes exactly this table.
    """
    shards = plan_shards(storage.read_parquet(nouns_uri), shard_size)
    completed = mask_cache.completed_shards(cache_uri)
    for stale in sorted(set(completed) - {name for name, _ in shards}):
        mask_cache.remove_shard(cache_uri, stale)
    plans = []
    for name, rows in shards:
        inputs = shard_inputs_digest(rows)
        record = completed.get(name)
        plans.append(ShardPlan(name, rows["image_id"].drop_duplicates().tolist(), inputs,
                               bool(record) and _committed_for(cache_uri, name, record, fingerprint, inputs)))
    return plans


def plan_shards(nouns: pd.DataFrame, shard_size: int) -> list[tuple[str, pd.DataFrame]]:
    """Split the nouns table into shards of ``shard_size`` images, in table order."""
    image_ids = nouns["image_id"].drop_duplicates().tolist()
    shards = []
    for number, start in enumerate(range(0, len(image_ids), shard_size)):
        chosen = set(image_ids[start : start + shard_size])
        shards.append((f"shard-{number:05d}", nouns[nouns["image_id"].isin(chosen)]))
    return shards


def run_mask_shard(
    nouns_rows: pd.DataFrame,
    cache_uri: str,
    shard_name: str,
    grounder_factory: Callable[[], Callable],
    fingerprint: str,
    batch_size: int,
    max_image_pixels: int,
) -> dict[str, Any]:
    """Ground one shard and commit it, unless it is already committed for the same inputs.

    The models come from ``grounder_factory`` only when there is work to do, so a
    resumed run loads nothing for its completed shards.
    """
    inputs = shard_inputs_digest(nouns_rows)
    done = mask_cache.completed_shards(cache_uri).get(shard_name)
    if done and _committed_for(cache_uri, shard_name, done, fingerprint, inputs):
        return {"shard": shard_name, "skipped": True, **done, **_throughput(0, 0.0), **placement(None)}
    grounder = grounder_factory()
    started = time.perf_counter()
    rows, rejects = ground_shard(nouns_rows, grounder, fingerprint, batch_size, max_image_pixels)
    seconds = time.perf_counter() - started
    # A shard where every image was rejected still commits (its rejects say why).
    mask_cache.commit_shard(cache_uri, shard_name, rows, rejects, inputs=inputs, fingerprint=fingerprint)
    # Stand-in grounders (tests) have no device: they run on the CPU.
    return {"shard": shard_name, "skipped": False, **mask_cache.completed_shards(cache_uri)[shard_name],
            **_throughput(nouns_rows["image_id"].nunique(), seconds), **placement(getattr(grounder, "device", "cpu"))}


def _throughput(images: int, seconds: float) -> dict[str, Any]:
    """A shard's grounding time and images/s (None when it ground nothing)."""
    return {"seconds": seconds, "images_per_s": images / seconds if seconds else None}
