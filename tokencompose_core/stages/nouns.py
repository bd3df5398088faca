"""Stage 1, nouns: manifest rows -> one caption each, its noun phrases and their token positions.

U-Net profiles: CLIP token positions (start token at 0). MMDiT profiles (SD 3, FLUX): the
noun's columns in the joint attention's text segment, from each of the model's own text
tokenizers, plus each encoder's positions (``encoder_positions``).

Output: ``<root>/nouns/nouns-<key>/nouns.parquet`` (+ ``rejects.parquet``), the key
from the nouns settings and the manifest's content. One unit: the whole table
(tagging is fast; batching is spaCy's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import pandas as pd

from tokencompose_core import mask_cache, outputs, storage
from tokencompose_core.config import ModelsConfig, NounsConfig, PipelineConfig
from tokencompose_core.identity import uri_identity
from tokencompose_core.manifest import (
    ENCODER_POSITIONS,
    MMDIT_NOUNS_SCHEMA,
    NOUNS_SCHEMA,
    NOUNS_STAGE,
    ImageError,
    ImagePaths,
    open_image,
    read_manifest,
)
from tokencompose_core.pinning import restrict_manifest
from tokencompose_core.stages import stage_fingerprint
from tokencompose_core.text import (
    CaptionSelector,
    JointPositions,
    TokenPositions,
    choose_caption,
    extract_nouns_batch,
    joint_token_positions,
    token_positions,
    unicode_problem,
)

# An MMDiT's joint text segment: (encoder, first column, length) of each of its text encoders.
TextLayout = Sequence[tuple[str, int, int]]


@dataclass(frozen=True)
class NounsPlan:
    manifest_uri: str
    manifest_identity: str
    fingerprint: str
    out_uri: str
    whole: bool  # the folder matches its record: the unit may be read from the cache

    @property
    def inputs(self) -> dict[str, Any]:
        return {"manifest": self.manifest_uri, "manifest_digest": self.manifest_identity}


def plan(config: PipelineConfig, input_uri: str | None) -> NounsPlan:
    """``input_uri``: the manifest (default ``nouns.manifest``)."""
    manifest_uri = input_uri or config.nouns.manifest
    if not manifest_uri:
        raise ValueError("no manifest: pass --input <manifest.jsonl|.parquet> or set nouns.manifest")
    storage.check_input(manifest_uri, config.storage)
    identity, fingerprint = uri_identity(manifest_uri), stage_fingerprint(config, "nouns")
    # The decoding guard decides which images CLIP caption choice can open.
    out_uri = outputs.output_folder(config, "nouns", "nouns", [fingerprint, identity, config.masks.max_image_pixels])
    return NounsPlan(manifest_uri, identity, fingerprint, out_uri, outputs.keep_if_whole(out_uri))


def seal(config: PipelineConfig, plan: NounsPlan, result: dict[str, Any]) -> None:
    outputs.seal(plan.out_uri, config, "nouns", plan.fingerprint, plan.inputs)


def summary(plan: NounsPlan, result: dict[str, Any]) -> dict[str, Any]:
    return {"manifest_uri": plan.manifest_uri, "output_uri": plan.out_uri, **result}


def _chosen_captions(rows: list[Any], selector: CaptionSelector | None, max_image_pixels: int) -> list[str | None]:
    """One caption per row (None when it has none); CLIP choice needs the image."""
    chosen: list[str | None] = []
    for row in rows:
        if not row.captions:
            chosen.append(None)
        elif selector is None or len(row.captions) == 1:
            chosen.append(choose_caption(row.captions))
        else:
            try:
                chosen.append(choose_caption(row.captions, open_image(row.image, max_image_pixels), selector))
            except ImageError:  # stage 2 rejects the image; any caption will do here
                chosen.append(row.captions[0])
    return chosen


def _row_problem(row: Any) -> str | None:
    """Why a manifest row cannot be processed at all (None when it can): its text, or an image
    path the manifest may not point to."""
    for field, value in (("image id", row.id), ("image path", row.image)):
        problem = unicode_problem(value)
        if problem:
            return f"{field} is not valid Unicode text: {problem}"
    problems = [unicode_problem(caption) for caption in row.captions]
    if row.captions and all(problems):
        return f"caption is not valid Unicode text: {problems[0]}"
    # A frame built without read_manifest has no path check of its own.
    return getattr(row, "path_problem", None)


def nouns_table(
    manifest: pd.DataFrame,
    tokenizer: Any,
    tagger_model: str | None = None,
    batch_size: int = 256,
    selector: CaptionSelector | None = None,
    max_image_pixels: int = 50_000_000,
    tagger: str = "spacy",
    layout: TextLayout | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stage 1: manifest rows -> (nouns table, rejects).

    Rejected: rows without a caption, whose id, path or every caption is not
    valid Unicode (dropped; a row's other valid captions are used) or whose image
    path :class:`ImagePaths` refused, captions without nouns and nouns without a
    token span (kept as an image with no usable noun).

    ``layout``: an MMDiT's joint text segment (``MMDiTParts.text_layout``); then ``tokenizer``
    maps each of its encoders to its tokenizer, ``token_positions`` holds joint columns, the
    table has ``encoder_positions``, and a noun one encoder cannot place is rejected naming it.
    """
    rows, rejects, usable_rows = [], [], []
    for row in manifest.itertuples(index=False):
        problem = _row_problem(row)
        if problem:
            rejects.append(mask_cache.reject_row(row.id, row.image, NOUNS_STAGE, problem))
        else:
            usable_rows.append(row._replace(captions=[c for c in row.captions if unicode_problem(c) is None]))
    captions = _chosen_captions(usable_rows, selector, max_image_pixels)
    with_caption = [caption for caption in captions if caption is not None]
    nouns_iter = iter(extract_nouns_batch(with_caption, model=tagger_model, batch_size=batch_size, tagger=tagger))
    for row, caption in zip(usable_rows, captions):
        if caption is None:
            rejects.append(mask_cache.reject_row(row.id, row.image, NOUNS_STAGE, "no caption"))
            continue
        nouns = next(nouns_iter)
        if not nouns:
            rejects.append(mask_cache.reject_row(row.id, row.image, NOUNS_STAGE, "no nouns"))
        usable = []
        for noun in nouns:
            positions = _positions(caption, noun, tokenizer, layout)
            if positions:
                usable.append({"noun": noun, **_position_columns(positions, layout)})
            else:
                reason = f"token-span failure: {positions.reason}"
                rejects.append(mask_cache.reject_row(row.id, row.image, NOUNS_STAGE, reason, noun))
        nothing = TokenPositions() if layout is None else JointPositions()
        for item in usable or [{"noun": None, **_position_columns(nothing, layout)}]:
            rows.append({"image_id": row.id, "image_uri": row.image, "caption": caption, **item})
    table = pd.DataFrame(rows, columns=(NOUNS_SCHEMA if layout is None else MMDIT_NOUNS_SCHEMA).names)
    return table, mask_cache.rejects_frame(rejects)


def noun_positions(models: ModelsConfig) -> Callable[[str, str], TokenPositions]:
    """``(caption, noun) -> positions`` for the profile's model: CLIP token positions for a U-Net,
    joint text-segment columns for an MMDiT (what stage 1 records, and the reference import too)."""
    tokenizer, layout = _text_tokenizers(models)
    return partial(_positions, tokenizer=tokenizer, layout=layout)


def _positions(caption: str, noun: str, tokenizer: Any, layout: TextLayout | None) -> TokenPositions:
    if layout is None:
        return token_positions(caption, noun, tokenizer)
    return joint_token_positions(caption, noun, tokenizer, layout)


def _position_columns(positions: TokenPositions, layout: TextLayout | None) -> dict[str, Any]:
    """The table's position columns of one row (MMDiT: with each encoder's own positions)."""
    columns: dict[str, Any] = {"token_positions": list(positions)}
    if layout is not None:  # by_encoder is in the layout's order
        columns[ENCODER_POSITIONS] = [{"encoder": e, "positions": p} for e, p in positions.by_encoder.items()]
    return columns


def write_nouns(table: pd.DataFrame, rejects: pd.DataFrame, out_dir: str) -> dict[str, str]:
    """Publish ``nouns.parquet`` and ``rejects.parquet`` under ``out_dir`` atomically."""
    uris = {
        "nouns_uri": storage.join(out_dir, "nouns.parquet"),
        "rejects_uri": storage.join(out_dir, "rejects.parquet"),
    }
    mask_cache.write_table(mask_cache.to_table(rejects, mask_cache.REJECT_SCHEMA), uris["rejects_uri"])
    schema = MMDIT_NOUNS_SCHEMA if ENCODER_POSITIONS in table.columns else NOUNS_SCHEMA
    mask_cache.write_table(mask_cache.to_table(table, schema), uris["nouns_uri"])
    return uris


def build_nouns(manifest_uri: str, out_dir: str, nouns: NounsConfig, models: ModelsConfig, max_image_pixels: int,
                allowed_roots: list[str] | None = None) -> dict[str, Any]:
    """Stage 1 end to end: read the manifest, write ``nouns.parquet`` + ``rejects.parquet``.

    The models' CLIP tokenizer gives the token positions (an MMDiT's own tokenizers, the
    joint columns), their ``clip_selector`` the CLIP caption choice; rows whose
    image lies outside ``allowed_roots`` (``storage.allowed_roots``) are rejected.
    """
    tokenizer, layout = _text_tokenizers(models)  # first: a missing snapshot fails before any work
    selector = None
    if nouns.caption_choice == "clip":
        if not models.clip_selector:
            raise ValueError("nouns.caption_choice is 'clip' but models.clip_selector is not set")
        from tokencompose_core.devices import resolve_device

        selector = CaptionSelector.from_pretrained(models.clip_selector, device=resolve_device("auto"))
    manifest = read_manifest(manifest_uri, ImagePaths.from_config(nouns, allowed_roots or []))
    manifest, outside = restrict_manifest(manifest, nouns.image_ids)  # rows of images not in nouns.image_ids
    tagger_model = nouns.flair_model if nouns.tagger == "flair" else nouns.spacy_model
    table, rejects = nouns_table(manifest, tokenizer, tagger_model, nouns.batch_size, selector,
                                 max_image_pixels, nouns.tagger, layout)
    rejects = mask_cache.rejects_frame(outside + rejects.to_dict("records"))
    uris = write_nouns(table, rejects, out_dir)
    return {**uris, "images": int(table["image_id"].nunique()), "rows": len(table), "rejects": len(rejects)}


def _text_tokenizers(models: ModelsConfig) -> tuple[Any, TextLayout | None]:
    """The token-position tokenizer(s) of the profile and, for an MMDiT, its text layout.

    U-Net profiles: the built-in CLIP tokenizer (no weights needed). MMDiT profiles: the
    model folder's own tokenizers (a real profile needs its snapshot)."""
    from tokencompose_core.models import clip_tokenizer, diffusion_family, encoder_text, resolve_diffusion_dir

    if diffusion_family(models) is None:
        return clip_tokenizer(), None
    return encoder_text(resolve_diffusion_dir(models), models.max_sequence_length)
