"""VISOR (Gokhale et al., 2022, "Benchmarking Spatial Relationships in Text-to-Image
Generation"): its SR2D prompt set and its metrics, computed from stage 5's detections.

SR2D pairs the 80 COCO categories two by two; each pair gives ten prompts, in this
order of ids: for each of the four relations, "A <relation> B" then "B <relation> A",
then "A and B" and "B and A". The benchmark then adds one single-object prompt per
category. VISOR scores only the spatial prompts, so ``visor:sr2d`` is those 25,280,
each under the id SR2D gives it; the set is rebuilt from that rule rather than shipped.

Per image, an object counts as found when a detection of its category scores above
the threshold (0.1 and OWL-ViT's ``a photo of a <category>`` queries in VISOR). OA is
the percentage of images in which both objects are found; an image is correct when, in
addition, some box of the first object and some box of the second have centroids in
the named relation (image y grows downwards, strict inequalities). VISOR_uncond is the
percentage of correct images, VISOR_cond the same among images with both objects, and
VISOR_n the percentage of prompts with at least n correct images (n = 1..4: VISOR
samples four images per prompt).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pandas as pd

from tokencompose_core import storage
from tokencompose_core.intervals import PER_UNIT_COLUMNS
from tokencompose_core.prompts import VISOR, Prompt

SR2D = "sr2d"
# The COCO category names in COCO's id order, as SR2D spells them.
COCO_CATEGORIES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
IDS_PER_PAIR = 10  # 4 relations x 2 orders, then the two "and" prompts VISOR does not score
VISOR_NS = (1, 2, 3, 4)
# VISOR's detector; our ``score.detector=owlvit`` runs it from ``models.owlvit``.
OWLVIT_WEIGHTS = "google/owlvit-base-patch32"
# TokenCompose's Table 1 "Object Accuracy" is VISOR's OA on SR2D (SD 1.4's is VISOR's own number).
PAPER_OA = {"SD 1.4": 29.86, "TokenCompose": 52.15}
METRICS = ["OA", "OA_A", "OA_B", "VISOR_uncond", "VISOR_cond", *(f"VISOR_{n}" for n in VISOR_NS)]


# ----------------------------------------------------------------------------- SR2D prompts


def article(noun: str) -> str:
    """The indefinite article SR2D puts before a COCO category (a vowel letter takes "an":
    no COCO name starts with a silent h or a "you"/"one" sound)."""
    return "an" if noun[0] in "aeiou" else "a"


def sr2d_prompts() -> list[Prompt]:
    """SR2D's spatial prompts under SR2D's ids, each with its two objects and relation."""
    prompts = []
    for pair, (a, b) in enumerate(itertools.combinations(COCO_CATEGORIES, 2)):
        for r, relation in enumerate(RELATIONS):
            for order, (first, second) in enumerate(((a, b), (b, a))):
                text = f"{article(first)} {first} {relation} {article(second)} {second}"
                prompts.append(Prompt(pair * IDS_PER_PAIR + 2 * r + order, text, (first, second), relation))
    return prompts


def load_visor_prompts(spec: str) -> list[Prompt]:
    """The prompts of a ``visor:<set>`` source (only ``visor:sr2d`` exists)."""
    name = spec[len(VISOR):]
    if name != SR2D:
        raise ValueError(f"unknown VISOR prompt set {name!r}; known: {SR2D}")
    return sr2d_prompts()


# ----------------------------------------------------------------------------- metrics


def _spatial(prompts: list[Prompt]) -> dict[int, Prompt]:
    """Prompts with a spatial relation between two distinct objects, by id."""
    return {p.prompt_id: p for p in prompts if p.relation in RELATIONS and len(set(p.categories)) == 2}


# Relation -> (centroid axis, sign of first minus second): image y grows downwards.
_RELATION_AXES = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1), "below": (1, 1)}
_KEY = ["prompt_id", "image_index"]


def relation_holds(relations: pd.Series, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per row: whether centroid ``first`` (x, y) is in ``relations`` to centroid ``second``
    (strictly: equal coordinates are in no relation)."""
    axis, sign = (relations.map(lambda r: _RELATION_AXES[r][k]).to_numpy(dtype=int) for k in (0, 1))
    rows = np.arange(len(relations))
    return sign * (first[rows, axis] - second[rows, axis]) > 0


def _objects(detections: pd.DataFrame, spatial: dict[int, Prompt], threshold: float) -> pd.DataFrame:
    """Detections above ``threshold`` of a spatial prompt's own two objects: the object's
    place in the prompt (``role`` 0 or 1) and the box centroid (``cx``, ``cy``)."""
    roles = pd.DataFrame([(i, c.lower(), role) for i, p in spatial.items() for role, c in enumerate(p.categories)],
                         columns=["prompt_id", "category", "role"])
    kept = detections[detections["score"] > threshold]
    kept = kept.assign(prompt_id=kept["prompt_id"].astype("int64"), category=kept["category"].str.lower())
    # Inner join with the prompt's own objects drops detections of other categories.
    kept = kept.merge(roles, on=["prompt_id", "category"])
    corners = np.asarray(kept["box"].tolist(), dtype=float).reshape(-1, 4)
    return kept.assign(image_index=kept["image_index"].astype("int64"), cx=(corners[:, 0] + corners[:, 2]) / 2,
                       cy=(corners[:, 1] + corners[:, 3]) / 2)[[*_KEY, "role", "cx", "cy"]]


def image_outcomes(detections: pd.DataFrame, prompts: list[Prompt], threshold: float,
                   images: pd.DataFrame) -> pd.DataFrame:
    """Per image of a spatial prompt (``images``: prompt_id, image_index): whether each object
    was found above ``threshold`` (``found_a``, ``found_b``) and whether the image is
    correct: both found, and some box of the first in the relation to some box of the second."""
    spatial = _spatial(prompts)
    if not spatial:
        raise ValueError("VISOR needs spatial two-object prompts (visor:sr2d); none were given")
    images = images[images["prompt_id"].isin(spatial)][_KEY].drop_duplicates().astype("int64")
    objects = _objects(detections, spatial, threshold)
    first, second = objects[objects["role"] == 0], objects[objects["role"] == 1]
    pairs = first.merge(second, on=_KEY, suffixes=("_a", "_b"))  # every box pair of an image
    relations = pairs["prompt_id"].map(lambda i: spatial[i].relation)
    pairs["holds"] = relation_holds(relations, pairs[["cx_a", "cy_a"]].to_numpy(), pairs[["cx_b", "cy_b"]].to_numpy())
    outcomes = images.assign(
        found_a=_has(images, first), found_b=_has(images, second),
        correct=_has(images, pairs[pairs["holds"]]))
    return outcomes.assign(both=outcomes["found_a"] & outcomes["found_b"])[
        [*_KEY, "found_a", "found_b", "both", "correct"]].reset_index(drop=True)


def _has(images: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """Per image of ``images``: whether ``rows`` has any row for it."""
    present = rows[_KEY].drop_duplicates().assign(present=True)
    return images.merge(present, on=_KEY, how="left")["present"].fillna(False).astype(bool).to_numpy()


def visor_scores(outcomes: pd.DataFrame) -> dict[str, Any]:
    """OA, OA of each object alone, VISOR_uncond/cond and VISOR_1..4 (percent) from
    :func:`image_outcomes`; VISOR_cond is None when no image has both objects, and VISOR_n
    when some prompt has fewer than n images (it could not reach n)."""
    if outcomes.empty:
        raise ValueError("VISOR: no images of spatial prompts to score")
    correct_per_prompt = outcomes.groupby("prompt_id")["correct"].sum()
    fewest = int(outcomes.groupby("prompt_id").size().min())
    both = int(outcomes["both"].sum())
    scores: dict[str, Any] = {
        "OA": 100.0 * outcomes["both"].mean(),
        "OA_A": 100.0 * outcomes["found_a"].mean(),
        "OA_B": 100.0 * outcomes["found_b"].mean(),
        "VISOR_uncond": 100.0 * outcomes["correct"].mean(),
        "VISOR_cond": 100.0 * outcomes["correct"].sum() / both if both else None,
        **{f"VISOR_{n}": 100.0 * float((correct_per_prompt >= n).mean()) if n <= fewest else None for n in VISOR_NS},
    }
    return {key: None if value is None else float(value) for key, value in scores.items()}


def per_prompt(outcomes: pd.DataFrame) -> pd.DataFrame:
    """Per prompt: OA and VISOR_uncond over its images, as rows (unit, metric, value); their
    mean over prompts is the run's when every prompt has as many images."""
    means = outcomes.groupby("prompt_id")[["both", "correct"]].mean() * 100.0
    frames = [pd.DataFrame({"unit": [f"prompt {i}" for i in means.index], "metric": metric,
                            "value": means[column].to_numpy(dtype=float)})
              for column, metric in (("both", "VISOR OA"), ("correct", "VISOR_uncond"))]
    return pd.concat(frames, ignore_index=True)[PER_UNIT_COLUMNS]


def is_visor_set(prompts: list[Prompt]) -> bool:
    """Whether the prompts carry spatial relations, so VISOR's metrics apply."""
    return bool(_spatial(prompts))


def score_visor(detections: pd.DataFrame, images: pd.DataFrame, prompts: list[Prompt], prompt_set: str,
                threshold: float, out_uri: str) -> str:
    """VISOR's metrics of one samples folder -> visor.json URI (+ per-prompt values for intervals)."""
    outcomes = image_outcomes(detections, prompts, threshold, images)
    storage.atomic_write_parquet(per_prompt(outcomes), storage.join(out_uri, "per_unit_visor.parquet"))
    images_per_prompt = outcomes.groupby("prompt_id").size()
    record = {"prompt_set": prompt_set, "threshold": threshold, "scores": visor_scores(outcomes),
              "images": int(len(outcomes)), "prompts": int(len(images_per_prompt)),
              "images_per_prompt": int(images_per_prompt.min())}
    uri = storage.join(out_uri, "visor.json")
    storage.atomic_write_json(uri, record)
    return uri


def report_table(records: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """VISOR's metrics per run (``visor.json`` records), then the paper's OA for SD 1.4 and
    TokenCompose on rows of their own: the one metric the paper reports from VISOR."""
    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}"

    rows = [{"run": name, **{metric: cell(record["scores"][metric]) for metric in METRICS},
             "images": str(record["images"]), "detector": record.get("detector") or "–"}
            for name, record in records.items()]
    rows += [{"run": f"paper: {model}", **{metric: "–" for metric in METRICS}, "OA": cell(oa), "images": "–",
              "detector": f"owlvit ({OWLVIT_WEIGHTS})"} for model, oa in PAPER_OA.items()]
    return pd.DataFrame(rows, columns=["run", *METRICS, "images", "detector"])
