"""What the U-Net is conditioned on: text embeddings, and SDXL's pooled text and size ids.

SD 1.x/2.x: the last hidden state of the one CLIP text encoder. SDXL: the
penultimate hidden states of both encoders (CLIP ViT-L, OpenCLIP bigG)
concatenated along features, plus ``added_cond_kwargs``: ``text_embeds``, the
second encoder's projected pooled output, and ``time_ids``, six numbers per
image: original size (h, w), crop top-left (top, left) and target size (h, w).
Both tokenizers share one BPE and differ only in the pad token, so a noun's
token positions are the same for both encoders' columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TextEmbeddings:
    """Encoded prompts: ``hidden`` (B, T, D) for cross-attention; ``pooled`` (B, P) for SDXL, else None."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TextEmbeddings":
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return TextEmbeddings(self.hidden.to(device, dtype), pooled)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, index: int) -> "TextEmbeddings":
        return TextEmbeddings(self.hidden[index], None if self.pooled is None else self.pooled[index])

    @staticmethod
    def stack(rows: Sequence["TextEmbeddings"]) -> "TextEmbeddings":
        """Rows taken with ``[i]`` back into a batch."""
        pooled = None if rows[0].pooled is None else torch.stack([row.pooled for row in rows])
        return TextEmbeddings(torch.stack([row.hidden for row in rows]), pooled)

    @staticmethod
    def cat(batches: Sequence["TextEmbeddings"]) -> "TextEmbeddings":
        pooled = None if batches[0].pooled is None else torch.cat([b.pooled for b in batches])
        return TextEmbeddings(torch.cat([b.hidden for b in batches]), pooled)

    def expand(self, size: int) -> "TextEmbeddings":
        """A batch of one repeated ``size`` times (without copying)."""
        pooled = None if self.pooled is None else self.pooled.expand(size, -1)
        return TextEmbeddings(self.hidden.expand(size, -1, -1), pooled)

    def zeros_like(self) -> "TextEmbeddings":
        pooled = None if self.pooled is None else torch.zeros_like(self.pooled)
        return TextEmbeddings(torch.zeros_like(self.hidden), pooled)


def _token_ids(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_text(encoders: Sequence[tuple[torch.nn.Module, Any]], texts: list[str]) -> TextEmbeddings:
    """Embeddings of ``texts`` by one (SD) or two (SDXL) (encoder, tokenizer) pairs."""
    if len(encoders) == 1:
        encoder, tokenizer = encoders[0]
        device = next(encoder.parameters()).device
        return TextEmbeddings(encoder(_token_ids(tokenizer, texts).to(device))[0])
    hidden, pooled = [], None
    for encoder, tokenizer in encoders:
        device = next(encoder.parameters()).device
        out = encoder(_token_ids(tokenizer, texts).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
        pooled = getattr(out, "text_embeds", None)  # the last encoder's, the one with a projection
    if pooled is None:
        raise ValueError("SDXL's second text encoder must be a CLIPTextModelWithProjection (no text_embeds)")
    return TextEmbeddings(torch.cat(hidden, dim=-1), pooled)


def encode_mmdit(parts: Any, texts: list[str]) -> TextEmbeddings:
    """An MMDiT's (SD 3.5, FLUX) conditioning of ``texts`` through its pipeline's own prompt encoding:
    ``hidden`` the joint attention's text tokens, ``pooled`` the pooled CLIP vector(s)."""
    text = parts.encode_prompt(texts)
    return TextEmbeddings(text.prompt_embeds, text.pooled_prompt_embeds)


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
             target_size: tuple[int, int]) -> list[int]:
    """SDXL's micro-conditioning of one image, in the order the U-Net was trained with."""
    return [*original_size, *crop_top_left, *target_size]


def square_time_ids(resolution: int, batch: int) -> torch.Tensor:
    """(B, 6) ids of an uncropped R x R image: what sampling asks for, and training's fallback."""
    return torch.tensor([time_ids((resolution, resolution), (0, 0), (resolution, resolution))] * batch,
                        dtype=torch.float32)


def unet_kwargs(text: TextEmbeddings, ids: torch.Tensor | None) -> dict[str, Any]:
    """The U-Net's conditioning keyword arguments; ``ids`` (B, 6) are read only when ``text`` has pooled embeddings."""
    if text.pooled is None:
        return {"encoder_hidden_states": text.hidden}
    if ids is None or ids.shape != (len(text), 6):
        raise ValueError(f"SDXL needs (batch, 6) add_time_ids for {len(text)} prompts, got "
                         f"{None if ids is None else tuple(ids.shape)}")
    ids = ids.to(text.pooled.device, text.pooled.dtype)
    return {"encoder_hidden_states": text.hidden, "added_cond_kwargs": {"text_embeds": text.pooled, "time_ids": ids}}
