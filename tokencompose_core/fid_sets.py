"""FID reference sets as the paper measures them: N random captions of COCO 2017 val or Flickr30k.

The paper follows the Stable Diffusion 1.4 model card: 10,000 captions drawn at
random from COCO 2017 val, one image sampled per caption, FID against the images
those captions describe. :func:`build_fid_set` draws the captions from the user's
own captions file and writes two files next to each other:

- ``<name>.jsonl``, a manifest (one row per drawn image: ``id``, ``image``,
  ``captions`` = the drawn captions of that image), for ``score.fid_reference``;
- ``<name>.txt``, the drawn captions one per line in drawing order, for
  ``sample.prompts``.

The draw is ``random.Random(seed).sample`` over every (image, caption) pair sorted
by image and caption id, so it depends only on the captions file, the count and the
seed, never on the file's row order. COCO val2017 has 5,000 images and about 25,000
captions, so 10,000 captions cover most images, many of them twice: the reference
holds each drawn image once.

Caption files: COCO's ``captions_<split>.json``; for Flickr30k either the original
``results_20130124.token`` (``<file>.jpg#<n>\\t<caption>`` lines) or Karpathy's
``dataset_flickr30k.json`` (whose ``split`` field ``split`` selects).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import random
from dataclasses import dataclass
from typing import Any, Iterator

from tokencompose_core import storage

DATASETS = ("coco", "flickr30k")
DEFAULT_COUNT = 10_000
DEFAULT_SEED = 0


@dataclass(frozen=True, order=True)
class Caption:
    """One caption of one image; ``order`` is the caption's id within its file."""

    image_id: str
    order: int
    file_name: str
    text: str


def _text(uri: str) -> str:
    try:
        return storage.read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{uri} is not UTF-8 text ({error})") from None


def _json(uri: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{uri} is not a JSON captions file ({error})") from None


@contextlib.contextmanager
def _entries(uri: str, expected: str) -> Iterator[None]:
    """An entry without the fields its format has: a ValueError naming the file and the format."""
    try:
        yield
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{uri} is not {expected}: an entry lacks {error}") from None


def coco_captions(uri: str) -> list[Caption]:
    """Every caption of COCO's ``captions_<split>.json`` (``images`` and ``annotations``)."""
    data = _json(uri, _text(uri))
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        raise ValueError(f"{uri} is not a COCO captions file (a JSON object with 'images' and 'annotations')")
    with _entries(uri, "a COCO captions file"):
        files = {image["id"]: image["file_name"] for image in data["images"]}
        captions = []
        for note in data["annotations"]:
            if note["image_id"] not in files:
                raise ValueError(f"{uri}: caption {note['id']} names image {note['image_id']}, which 'images' lacks")
            captions.append(Caption(str(note["image_id"]), int(note["id"]), files[note["image_id"]],
                                    str(note["caption"])))
    return captions


def _karpathy_captions(uri: str, data: dict[str, Any], split: str | None) -> list[Caption]:
    images = [image for image in data["images"] if split is None or image.get("split") == split]
    if not images:
        splits = sorted({str(image.get("split")) for image in data["images"]})
        raise ValueError(f"{uri} has no image in split {split!r} (its splits: {', '.join(splits)})")
    return [Caption(posixpath.splitext(image["filename"])[0], order, image["filename"], sentence["raw"])
            for image in images for order, sentence in enumerate(image["sentences"])]


def _token_captions(uri: str, text: str) -> list[Caption]:
    captions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        file_name, hash_sign, order = key.partition("#")
        if not (tab and hash_sign and order.isdigit()):
            raise ValueError(f"{uri}: line {number} is not '<image>.jpg#<n><TAB><caption>' (Flickr30k's token format)")
        captions.append(Caption(posixpath.splitext(file_name)[0], int(order), file_name, caption))
    return captions


def flickr30k_captions(uri: str, split: str | None = None) -> list[Caption]:
    """Every caption of a Flickr30k captions file: Karpathy's JSON (``split`` picks its
    ``train``/``val``/``test`` images) or the ``.token`` lines (which have no split)."""
    text = _text(uri)
    if text.lstrip().startswith("{"):
        data = _json(uri, text)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{uri} is not Karpathy's dataset_flickr30k.json (no 'images' list)")
        with _entries(uri, "Karpathy's dataset_flickr30k.json"):
            return _karpathy_captions(uri, data, split)
    if split is not None:
        raise ValueError(f"{uri} is a .token file, which has no splits; drop --split or use dataset_flickr30k.json")
    return _token_captions(uri, text)


def draw(captions: list[Caption], count: int, seed: int) -> list[Caption]:
    """``count`` captions drawn without replacement, the same for the same captions and seed."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    # A blank caption would be a blank line, which a prompt file skips.
    pool = sorted(caption for caption in captions if caption.text.strip())
    if count > len(pool):
        raise ValueError(f"asked for {count} captions but the file has {len(pool)}")
    return random.Random(seed).sample(pool, count)


def _absolute(uri: str) -> str:
    # The manifest names absolute images (stage 1's rules allow them by default), so it can live anywhere.
    return uri if "://" in uri else os.path.abspath(uri)


def _image_uri(images: str, file_name: str) -> str:
    return storage.join(_absolute(images), file_name)


def manifest_rows(drawn: list[Caption], images: str) -> list[dict[str, Any]]:
    """One manifest row per drawn image, in order of first draw, with its drawn captions."""
    rows: dict[str, dict[str, Any]] = {}
    for caption in drawn:
        row = rows.setdefault(caption.image_id, {"id": caption.image_id,
                                                 "image": _image_uri(images, caption.file_name), "captions": []})
        row["captions"].append(_one_line(caption.text))
    return list(rows.values())


def _one_line(text: str) -> str:
    # A prompt file holds one caption per line; COCO captions carry stray newlines and spaces.
    return " ".join(text.split())


def _check_images(rows: list[dict[str, Any]], images: str) -> None:
    missing = [row["image"] for row in rows if not storage.exists(row["image"])]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(rows)} drawn images are not in {images} "
                                f"(first: {missing[0]}); pass the folder holding the captions file's images")


def default_name(dataset: str, captions_uri: str, count: int, split: str | None = None) -> str:
    """``coco-val2017-10000`` for COCO's captions_val2017.json, ``flickr30k[-<split>]-10000``."""
    if dataset == "coco":
        stem = posixpath.splitext(posixpath.basename(captions_uri))[0].removeprefix("captions_")
        return f"coco-{stem}-{count}"
    return "-".join(["flickr30k", *([split] if split else []), str(count)])


def build_fid_set(dataset: str, captions_uri: str, images: str, out: str, count: int = DEFAULT_COUNT,
                  seed: int = DEFAULT_SEED, split: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Draw ``count`` captions of ``dataset`` and write ``<out>/<name>.jsonl`` (the FID reference
    manifest) and ``<out>/<name>.txt`` (the prompts); returns their URIs and counts."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown FID dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    if dataset == "coco" and split is not None:
        raise ValueError("--split is for Karpathy's dataset_flickr30k.json; COCO's captions file is one split")
    if not storage.exists(captions_uri):
        raise FileNotFoundError(f"captions file not found: {captions_uri}")
    captions = coco_captions(captions_uri) if dataset == "coco" else flickr30k_captions(captions_uri, split)
    drawn = draw(captions, count, seed)
    rows = manifest_rows(drawn, images)
    _check_images(rows, images)
    name = name or default_name(dataset, captions_uri, count, split)
    manifest, prompts = storage.join(_absolute(out), f"{name}.jsonl"), storage.join(_absolute(out), f"{name}.txt")
    storage.atomic_write_bytes(manifest, "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))
    storage.atomic_write_bytes(prompts, "".join(_one_line(c.text) + "\n" for c in drawn).encode("utf-8"))
    return {"manifest": manifest, "prompts": prompts, "captions": len(drawn), "images": len(rows),
            "seed": seed, "source": captions_uri}
