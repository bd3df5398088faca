"""A synthetic compositional world we control, and a detector for it.

Images are small grey canvases holding 1 to 5 objects. Each category has one
colour and one 5x5 shape, so every object's mask is known exactly and a colour
detector recognises it reliably. Two category names are several CLIP tokens
("hourglass" -> hour+glass, "bowtie" -> bow+tie) so multi-token nouns are
exercised. Captions come in MultiGen form ("a photo of a A, a B, and a C.") and
free form ("a B left of a A on grey"). Everything is a pure function of a seed.

The world is written as a normal manifest, nouns table and mask cache (see
:func:`write_world`) so the real stages consume it unchanged; the detector
writes the same detections schema as the OWLv2 path.
"""

from __future__ import annotations

import io
import itertools
import json
import random
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from tokencompose_core import mask_cache, storage
from tokencompose_core.config import DetectorConfig, WorldConfig
from tokencompose_core.identity import value_hash
from tokencompose_core.manifest import NOUNS_SCHEMA
from tokencompose_core.text import token_positions

BACKGROUND = (128, 128, 128)
STENCIL_SIZE = 5


@dataclass(frozen=True)
class Category:
    name: str
    color: tuple[int, int, int]
    stencil: tuple[str, ...]  # STENCIL_SIZE rows of '#' (object) and '.' (background)

    def mask(self) -> np.ndarray:
        return np.array([[c == "#" for c in row] for row in self.stencil], dtype=bool)


CATEGORIES: tuple[Category, ...] = (
    Category("circle", (220, 40, 40), (".###.", "#####", "#####", "#####", ".###.")),
    Category("square", (40, 80, 230), ("#####", "#####", "#####", "#####", "#####")),
    Category("triangle", (40, 180, 60), ("..#..", ".###.", ".###.", "#####", "#####")),
    Category("cross", (235, 215, 40), ("..#..", "..#..", "#####", "..#..", "..#..")),
    Category("hourglass", (210, 50, 210), ("#####", ".###.", "..#..", ".###.", "#####")),
    Category("bowtie", (40, 205, 215), ("#...#", "##.##", "#####", "##.##", "#...#")),
)
CATEGORY_BY_NAME = {category.name: category for category in CATEGORIES}


@dataclass(frozen=True)
class PlacedObject:
    category: Category
    top: int
    left: int

    def mask(self, size: int) -> np.ndarray:
        canvas = np.zeros((size, size), dtype=bool)
        canvas[self.top : self.top + STENCIL_SIZE, self.left : self.left + STENCIL_SIZE] = self.category.mask()
        return canvas

    def box(self) -> list[float]:
        """Tight x0, y0, x1, y1 (exclusive) around the stencil's object pixels."""
        rows, cols = np.nonzero(self.category.mask())
        return [float(self.left + cols.min()), float(self.top + rows.min()),
                float(self.left + cols.max() + 1), float(self.top + rows.max() + 1)]

    def center(self) -> tuple[float, float]:
        half = STENCIL_SIZE / 2
        return self.left + half, self.top + half


@dataclass(frozen=True)
class Scene:
    objects: tuple[PlacedObject, ...]
    size: int

    @property
    def names(self) -> list[str]:
        return [obj.category.name for obj in self.objects]

    def image(self) -> np.ndarray:
        """HxWx3 uint8 RGB."""
        pixels = np.empty((self.size, self.size, 3), dtype=np.uint8)
        pixels[:] = BACKGROUND
        for obj in self.objects:
            pixels[obj.mask(self.size)] = obj.category.color
        return pixels


def _window_sums(occupied: np.ndarray) -> np.ndarray:
    """Occupied pixels under the stencil at every (top, left), via an integral image."""
    integral = np.zeros((occupied.shape[0] + 1, occupied.shape[1] + 1), dtype=np.int32)
    integral[1:, 1:] = occupied.cumsum(0).cumsum(1)
    k = STENCIL_SIZE
    return integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]


def place_objects(names: Sequence[str], size: int, rng: random.Random, attempts: int = 100) -> Scene:
    """Non-overlapping placement of one stencil per name (objects may touch): each
    object takes a uniformly random free position; a dead end restarts the layout."""
    for _ in range(attempts):
        occupied = np.zeros((size, size), dtype=bool)
        placed: list[PlacedObject] = []
        for name in names:
            free = np.argwhere(_window_sums(occupied) == 0)
            if not len(free):
                break
            top, left = (int(v) for v in free[rng.randrange(len(free))])
            occupied[top : top + STENCIL_SIZE, left : left + STENCIL_SIZE] = True
            placed.append(PlacedObject(CATEGORY_BY_NAME[name], top, left))
        if len(placed) == len(names):
            return Scene(tuple(placed), size)
    raise RuntimeError(f"could not place {len(names)} objects on a {size}px canvas")


def multigen_caption(names: Sequence[str]) -> str:
    """MultiGen's prompt form: 'a photo of a A, a B, and a C.'."""
    items = [f"a {name}" for name in names]
    if len(items) == 1:
        return f"a photo of {items[0]}."
    if len(items) == 2:
        return f"a photo of {items[0]} and {items[1]}."
    return f"a photo of {', '.join(items[:-1])}, and {items[-1]}."


def _relation(a: PlacedObject, b: PlacedObject) -> str:
    """Where ``a`` is relative to ``b``, along the axis where they differ most."""
    (ax, ay), (bx, by) = a.center(), b.center()
    if abs(ax - bx) >= abs(ay - by):
        return "left of" if ax < bx else "right of"
    return "above" if ay < by else "below"


def freeform_caption(scene: Scene, rng: random.Random) -> str:
    """A free-form caption whose spatial words are true of the scene."""
    objects = list(scene.objects)
    rng.shuffle(objects)
    names = [obj.category.name for obj in objects]
    if len(objects) == 1:
        return f"a {names[0]} on grey"
    if len(objects) == 2:
        relation = rng.choice([_relation(objects[0], objects[1]), "next to"])
        return f"a {names[0]} {relation} a {names[1]} on grey"
    listed = ", ".join(f"a {name}" for name in names[:-1])
    return f"{listed} and a {names[-1]} on a grey background"


def heldout_combinations(config: WorldConfig) -> list[tuple[str, ...]]:
    """The category sets no training scene has, chosen by the world's seed."""
    rng = random.Random(f"heldout-{config.seed}")
    names = [category.name for category in CATEGORIES]
    chosen: list[tuple[str, ...]] = []
    for size, count in sorted(config.heldout_combinations.items()):
        combos = list(itertools.combinations(names, size))
        if count >= len(combos):
            raise ValueError(f"holding out {count} of {len(combos)} {size}-object combinations leaves none")
        chosen.extend(rng.sample(combos, count))
    return chosen


@dataclass(frozen=True)
class WorldSample:
    image_id: str
    scene: Scene
    caption: str


def train_samples(config: WorldConfig) -> Iterable[WorldSample]:
    """The training split, one scene at a time, skipping held-out combinations."""
    rng = random.Random(f"train-{config.seed}")
    heldout = {frozenset(combo) for combo in heldout_combinations(config)}
    names = [category.name for category in CATEGORIES]
    index = 0
    while index < config.train_images:
        count = rng.randint(config.min_objects, config.max_objects)
        chosen = rng.sample(names, count)
        if frozenset(chosen) in heldout:
            continue
        scene = place_objects(chosen, config.image_size, rng)
        if rng.random() < config.freeform_fraction:
            caption = freeform_caption(scene, rng)
        else:
            caption = multigen_caption(chosen)
        yield WorldSample(f"world-{config.seed}-{index:06d}", scene, caption)
        index += 1


@dataclass(frozen=True)
class TestPrompt:
    prompt_id: int
    text: str
    categories: tuple[str, ...]
    heldout: bool  # the combination never appears as a training scene


def test_prompts(config: WorldConfig, object_counts: Sequence[int], per_count: int) -> list[TestPrompt]:
    """MultiGen-style prompts: every held-out combination of each size, then seen
    combinations, each in a seeded random order, ``per_count`` per size."""
    rng = random.Random(f"test-{config.seed}")
    heldout = heldout_combinations(config)
    names = [category.name for category in CATEGORIES]
    prompts: list[TestPrompt] = []
    for count in object_counts:
        unseen = [combo for combo in heldout if len(combo) == count]
        seen = [c for c in itertools.combinations(names, count) if c not in set(unseen)]
        rng.shuffle(seen)
        picks = [(combo, True) for combo in unseen] + [(combo, False) for combo in seen]
        for combo, is_heldout in itertools.islice(itertools.cycle(picks), per_count):
            order = rng.sample(list(combo), len(combo))
            prompts.append(TestPrompt(len(prompts), multigen_caption(order), tuple(order), is_heldout))
    return prompts


def test_samples(config: WorldConfig, count: int) -> list[WorldSample]:
    """Held-out ground truth (detector accuracy, attention mIoU): a seed stream
    training never uses, MultiGen captions."""
    rng = random.Random(f"test-scenes-{config.seed}")
    names = [category.name for category in CATEGORIES]
    samples = []
    for index in range(count):
        chosen = rng.sample(names, rng.randint(config.min_objects, config.max_objects))
        scene = place_objects(chosen, config.image_size, rng)
        samples.append(WorldSample(f"test-{config.seed}-{index:06d}", scene, multigen_caption(chosen)))
    return samples


# ---------------------------------------------------------------- detector


@dataclass(frozen=True)
class Detection:
    category: str
    score: float
    box: list[float]


def _palette() -> np.ndarray:
    return np.array([BACKGROUND] + [category.color for category in CATEGORIES], dtype=np.float32)


def label_pixels(image: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: index into CATEGORIES (-1 for background or no palette colour
    within ``tolerance``) and the distance to that nearest palette colour."""
    distances = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - _palette(), axis=-1)
    nearest = distances.argmin(axis=-1)
    distance = distances.min(axis=-1)
    labels = np.where((nearest > 0) & (distance <= tolerance), nearest - 1, -1)
    return labels, distance


def _with_same_neighbour(labels: np.ndarray) -> np.ndarray:
    """Keep only labelled pixels with at least one 4-neighbour of the same label:
    isolated speckles of a colour in generated images are noise, not objects."""
    padded = np.pad(labels, 1, constant_values=-1)
    centre = padded[1:-1, 1:-1]
    same = np.zeros(labels.shape, dtype=bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        same |= padded[1 + dy : padded.shape[0] - 1 + dy, 1 + dx : padded.shape[1] - 1 + dx] == centre
    return np.where(same & (labels >= 0), labels, -1)


def _components(mask: np.ndarray, reach: int) -> list[np.ndarray]:
    """Groups of mask pixels, as arrays of (row, col); pixels up to ``reach`` apart
    (Chebyshev distance) join one group, so a shape cut by a stray pixel of another
    colour across a thin part stays one object."""
    seen = np.zeros(mask.shape, dtype=bool)
    steps = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1) if dy or dx]
    found: list[np.ndarray] = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, members = deque([start]), []
        while queue:
            y, x = queue.popleft()
            members.append((y, x))
            for ny, nx in ((y + dy, x + dx) for dy, dx in steps):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(np.array(members))
    return found


def detect(image: np.ndarray, config: DetectorConfig | None = None) -> list[Detection]:
    """Objects in an HxWx3 uint8 image: one detection per connected same-colour
    region of at least ``min_pixels``; score = mean closeness to the palette colour."""
    config = config or DetectorConfig()
    labels, distance = label_pixels(image, config.tolerance)
    labels = _with_same_neighbour(labels)
    detections: list[Detection] = []
    for index, category in enumerate(CATEGORIES):
        for members in _components(labels == index, config.reach):
            if len(members) < config.min_pixels:
                continue
            rows, cols = members[:, 0], members[:, 1]
            score = float(np.clip(1.0 - distance[rows, cols] / config.tolerance, 0.0, 1.0).mean())
            box = [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]
            detections.append(Detection(category.name, score, box))
    return detections


DETECTION_COLUMNS = ["prompt_id", "image_index", "category", "score", "box"]


def detections_frame(
    images: Iterable[tuple[int, int, np.ndarray]],
    config: DetectorConfig | None = None,
    store_threshold: float = 0.01,
) -> pd.DataFrame:
    """Detections for (prompt_id, image_index, image) triples in the shared schema."""
    rows: list[dict[str, Any]] = []
    for prompt_id, image_index, image in images:
        for found in detect(image, config):
            if found.score > store_threshold:
                rows.append({"prompt_id": int(prompt_id), "image_index": int(image_index),
                             "category": found.category, "score": found.score, "box": found.box})
    frame = pd.DataFrame(rows, columns=DETECTION_COLUMNS)
    return frame.astype({"prompt_id": "int64", "image_index": "int64", "score": "float32"})


# ---------------------------------------------------------------- serialisation


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def world_fingerprint(config: WorldConfig) -> str:
    return f"synthetic-world:{value_hash(config.model_dump(mode='json'))}"


class _SpanCache:
    """Token spans memoised per (caption, noun): the world repeats its captions."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.spans: dict[tuple[str, str], list[int]] = {}

    def __call__(self, caption: str, noun: str) -> list[int]:
        key = (caption, noun)
        if key not in self.spans:
            positions = token_positions(caption, noun, self.tokenizer)
            if not positions:  # the generator writes every name into the caption
                raise ValueError(f"{noun!r} has no token span in {caption!r} ({positions.reason})")
            self.spans[key] = list(positions)
        return self.spans[key]


def _grounded_rows(sample: WorldSample, image_uri: str, spans: _SpanCache, fingerprint: str) -> list[dict[str, Any]]:
    """Mask-cache rows of one scene: every object with its exact mask and token span."""
    size = sample.scene.size
    return [mask_cache.shard_row(sample.image_id, image_uri, sample.caption, size, size, fingerprint,
                                 noun=obj.category.name, token_positions=spans(sample.caption, obj.category.name),
                                 mask=obj.mask(size), box=obj.box(), score=1.0)
            for obj in sample.scene.objects]


def _write_image(uri_and_image: tuple[str, np.ndarray]) -> None:
    storage.atomic_write_bytes(uri_and_image[0], png_bytes(uri_and_image[1]))


def _chunks(items: Iterable[WorldSample], size: int) -> Iterable[list[WorldSample]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def write_split(samples: Iterable[WorldSample], nouns_uri: str, cache_uri: str, tokenizer: Any,
                fingerprint: str, shard_size: int = 4096) -> dict[str, Any]:
    """Write one split as stages 1-2 would have: under ``nouns_uri`` the images, ``manifest.jsonl``
    (first caption = the grounded one) and ``nouns.parquet``; the exact masks as the mask
    cache ``cache_uri``. Returns the URIs and counts."""
    image_dir = storage.join(nouns_uri, "images")
    spans = _SpanCache(tokenizer)
    manifest, nouns, shards = [], [], 0
    # Thousands of tiny files: each atomic write waits on fsync, so many wait at once.
    with ThreadPoolExecutor(max_workers=32) as pool:
        for chunk in _chunks(samples, shard_size):
            uris = [storage.join(image_dir, f"{sample.image_id}.png") for sample in chunk]
            written = pool.map(_write_image, [(uri, sample.scene.image()) for uri, sample in zip(uris, chunk)])
            shard_rows = []
            for sample, uri in zip(chunk, uris):
                # The other caption form is kept as a second caption, as real datasets have several.
                alternate = multigen_caption(sample.scene.names)
                captions = [sample.caption] + ([alternate] if alternate != sample.caption else [])
                manifest.append({"id": sample.image_id, "image": f"images/{sample.image_id}.png",
                                 "captions": captions})
                shard_rows += _grounded_rows(sample, uri, spans, fingerprint)
            list(written)  # every image is published before its shard is committed
            nouns += [{k: row[k] for k in NOUNS_SCHEMA.names} for row in shard_rows]
            mask_cache.commit_shard(cache_uri, f"shard-{shards:05d}", mask_cache.rows_frame(shard_rows))
            shards += 1
    manifest_uri = storage.join(nouns_uri, "manifest.jsonl")
    storage.atomic_write_bytes(manifest_uri, "".join(json.dumps(row) + "\n" for row in manifest).encode())
    table_uri = storage.join(nouns_uri, "nouns.parquet")
    mask_cache.write_table(mask_cache.to_table(pd.DataFrame(nouns, columns=NOUNS_SCHEMA.names), NOUNS_SCHEMA),
                           table_uri)
    return {"manifest_uri": manifest_uri, "nouns_uri": table_uri, "cache_uri": cache_uri,
            "images": len(manifest), "nouns": len(nouns)}
