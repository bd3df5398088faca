"""Generate the bad-input corpus in ``tests/data/bad/`` (small files, committed).

    python tests/data/make_bad_corpus.py          # rewrites tests/data/bad/

Everything is derived from fixed seeds and PIL, so a rerun writes the same bytes.
The two decompression bombs are a few hundred bytes: a real header that claims
20,000 x 20,000 pixels and almost no pixel data behind it.

Layout::

    images/   good and bad image files (see IMAGES)
    manifest.jsonl            one row per image and per bad caption: the batch test
    manifest_duplicate_ids.jsonl, manifest_missing_image.jsonl, manifest_wrong_types.jsonl,
    manifest_not_json.jsonl, manifest_not_utf8.jsonl, manifest_missing_columns.parquet, manifest_wrong_types.parquet
    prompts_not_json.json, prompts_wrong_shape.json, prompts_binary.txt
    expected.json             what each manifest row must turn into (the test's oracle)
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

OUT = Path(__file__).resolve().parent / "bad"
BOMB_SIDE = 20_000
GOOD_CAPTION = "a dog next to a red ball"


def _photo(seed: int, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """A smooth RGB test picture (compresses well, decodes exactly as PNG)."""
    rng = np.random.default_rng(seed)
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 256, size=3)
    picture = (base + 3 * xs[..., None] + 2 * ys[..., None]) % 256
    return picture.astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A valid PNG header for a side x side greyscale image with one compressed row of data."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    pixels = zlib.compress(b"\x00" * (side + 1), 9)  # one filter byte + one row; the rest is missing
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


def jpeg_bomb(side: int = BOMB_SIDE) -> bytes:
    """A small real JPEG whose start-of-frame marker is patched to claim side x side pixels."""
    data = bytearray(_encode(Image.fromarray(_photo(7, (16, 16))), "JPEG", quality=50))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)  # height, width
    return bytes(data)


def images() -> dict[str, bytes]:
    """File name -> bytes of every corpus image."""
    good = Image.fromarray(_photo(0))
    jpeg = _encode(good, "JPEG", quality=90)
    png = _encode(good, "PNG")
    grey16 = (np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 29) % 65535
    rgba = np.dstack([_photo(3), np.linspace(0, 255, 48 * 40, dtype=np.uint8).reshape(40, 48)])
    corrupt_png = bytearray(png)
    idat = corrupt_png.find(b"IDAT")
    corrupt_png[idat + 8 : idat + 40] = bytes(range(32))  # garbage in the compressed stream (CRC now wrong too)
    return {
        "good.jpg": jpeg,
        "good.png": png,
        "zero.jpg": b"",
        "zero.png": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8)),
        "corrupt.png": bytes(corrupt_png),
        "not_an_image.png": b"this is a text file with a .png name\n",
        "cmyk.jpg": _encode(good.convert("CMYK"), "JPEG", quality=90),
        "grey.png": _encode(good.convert("L"), "PNG"),
        "grey16.png": _encode(Image.fromarray(grey16), "PNG"),
        "alpha.png": _encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "palette.gif": _encode(good.convert("P"), "GIF"),
        "bomb.png": png_bomb(),
        "bomb.jpg": jpeg_bomb(),
        "one_pixel.png": _encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"),
        "sliver_wide.png": _encode(Image.new("RGB", (400, 1), (30, 200, 30)), "PNG"),
        "sliver_tall.png": _encode(Image.new("RGB", (7, 2000), (30, 30, 200)), "PNG"),
    }


# Image file -> what the masks stage must do with it: "ok" (converted to RGB and
# grounded), "handled" (opens; grounded, or rejected as "grounding failed" when the
# detector cannot take its shape) or the start of its rejects reason.
IMAGE_OUTCOMES = {
    "one_pixel.png": "handled",
    "sliver_wide.png": "handled",
    "sliver_tall.png": "handled",
    "good.jpg": "ok",
    "good.png": "ok",
    "cmyk.jpg": "ok",
    "grey.png": "ok",
    "grey16.png": "ok",
    "alpha.png": "ok",
    "palette.gif": "ok",
    "zero.jpg": "unreadable image",
    "zero.png": "unreadable image",
    "truncated.jpg": "unreadable image",
    "truncated.png": "unreadable image",
    "corrupt.jpg": "unreadable image",
    "corrupt.png": "unreadable image",
    "not_an_image.png": "unreadable image",
    "bomb.png": "image too large",
    "bomb.jpg": "image too large",
    "missing.jpg": "unreadable image: file not found",  # listed in the manifest, not on disk
}

# Manifest rows whose image is not a file of images/: row id -> (image, start of its rejects reason).
OTHER_IMAGES = {
    # No fsspec HTTP backend (aiohttp) is installed, or nothing listens on port 9: either way unreadable.
    "img-http-url": ("http://127.0.0.1:9/remote.png", "unreadable image: http://127.0.0.1:9/remote.png"),
    "img-folder": ("images/folder.png", "unreadable image: "),  # a folder named like an image
}

# Caption id -> (caption, what the nouns stage must do): "nouns" (at least one
# usable noun), "handled" (nouns or a rejects row: the tagger decides), or the
# rejects reason of the image.
CAPTIONS = {
    "cap-empty": ("", "no caption"),
    "cap-blank": ("   \t  ", "no caption"),
    "cap-punctuation": ("!!! ... ??? ,,, ;;; --- !!!", "no nouns"),
    # 500 words; the giraffe lies past the 77-token limit and is rejected alone.
    "cap-500-words": (" ".join(["a dog chases a ball across the wide green park"] * 49 + ["and then a giraffe"]),
                      "nouns"),
    "cap-chinese": ("一只狗在公园里追一个红色的球", "handled"),
    "cap-russian-with-latin": ("собака и мяч, a dog and a ball", "nouns"),
    "cap-arabic": ("كلب يلعب بالكرة في الحديقة", "handled"),
    "cap-emoji": ("🐶 a dog 🐕 with a 🎾 ball 😀😀😀", "nouns"),
    "cap-only-emoji": ("🐶🎾😀🌳", "handled"),
    "cap-slash": ("a cat/dog on a mat/rug", "nouns"),
    "cap-dotdot": ("a ../../etc/passwd file next to a .. folder", "nouns"),
    "cap-nul": ("a cat\x00dog on a \x00 mat", "nouns"),
    "cap-rtl-control": ("a dog\u202e llab a\u202c next to a tree", "nouns"),
    # A JSON "\ud800" escape decodes to a lone surrogate: not text, the tagger cannot take it.
    "cap-lone-surrogate": ("a dog \ud800 and a ball", "caption is not valid Unicode text"),
}


def manifest_rows() -> list[dict]:
    """The batch manifest: every image with a good caption, every bad caption with a good image."""
    rows = [{"id": f"img-{Path(name).stem}-{Path(name).suffix[1:]}", "image": f"images/{name}", "captions": [GOOD_CAPTION]}
            for name in IMAGE_OUTCOMES]
    rows += [{"id": row_id, "image": image, "captions": [GOOD_CAPTION]} for row_id, (image, _) in OTHER_IMAGES.items()]
    rows += [{"id": caption_id, "image": "images/good.png", "captions": [caption]}
             for caption_id, (caption, _) in CAPTIONS.items()]
    return rows


def expected() -> dict:
    rows = manifest_rows()
    image_ids = {row["id"]: IMAGE_OUTCOMES[Path(row["image"]).name] for row in rows[: len(IMAGE_OUTCOMES)]}
    image_ids.update({row_id: outcome for row_id, (_, outcome) in OTHER_IMAGES.items()})
    return {"images": image_ids, "captions": {key: outcome for key, (_, outcome) in CAPTIONS.items()}}


def _json_line(row: dict) -> str:
    try:
        return json.dumps(row, ensure_ascii=False).encode("utf-8").decode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only a \u escape can carry it, as in real files
        return json.dumps(row)


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(_json_line(row) + "\n" for row in rows).encode("utf-8")


def bad_manifests() -> dict[str, bytes]:
    """Whole-file problems: each must give one clear error naming the file and the problem."""
    good = {"image": "images/good.png", "captions": [GOOD_CAPTION]}
    missing_columns = io.BytesIO()
    pd.DataFrame({"id": ["a", "b"], "caption_text": ["x", "y"]}).to_parquet(missing_columns, index=False)
    wrong_types = io.BytesIO()
    pd.DataFrame({"id": [1, 2], "image": [3.5, 4.5], "captions": [7, 8]}).to_parquet(wrong_types, index=False)
    return {
        "manifest_duplicate_ids.jsonl": _jsonl([{"id": "same", **good}, {"id": "other", **good}, {"id": "same", **good}]),
        "manifest_missing_image.jsonl": _jsonl([{"id": "a", **good}, {"id": "b", "captions": [GOOD_CAPTION]}]),
        "manifest_wrong_types.jsonl": _jsonl([{"id": "a", **good}, {"id": "b", "image": ["a.png"], "captions": 5}]),
        "manifest_not_json.jsonl": _jsonl([{"id": "a", **good}]) + b"{this is not json\n",
        "manifest_not_object.jsonl": b'["images/good.png", "a dog"]\n',
        "manifest_not_utf8.jsonl": _jsonl([{"id": "a", **good}]) + '{"id": "b", "captions": ["caf\u00e9"]}\n'.encode("latin-1"),
        "manifest_missing_columns.parquet": missing_columns.getvalue(),
        "manifest_wrong_types.parquet": wrong_types.getvalue(),
        "prompts_not_json.json": b"a dog and a ball\nthis is not JSON\n",
        "prompts_wrong_shape.json": json.dumps({"text": "a dog"}).encode(),
        "prompts_binary.txt": b"\xff\xfe\x00a\x00 \x00d\x00o\x00g\xff",
    }


def write(out: Path = OUT) -> list[Path]:
    """Write the corpus; returns the files written."""
    files = {**{f"images/{name}": data for name, data in images().items()}, **bad_manifests()}
    files["manifest.jsonl"] = _jsonl(manifest_rows())
    files["images/folder.png/README"] = b"A folder named like an image: the masks stage must reject it.\n"
    files["expected.json"] = (json.dumps(expected(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    written = []
    for relative, data in sorted(files.items()):
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written


if __name__ == "__main__":
    paths = write()
    total = sum(path.stat().st_size for path in paths)
    print(f"wrote {len(paths)} files, {total} bytes, under {OUT}")
