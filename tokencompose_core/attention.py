"""Cross-attention capture for the grounding losses.

Only the supervised cross-attention layers (``attn2`` of the chosen U-Net parts)
get :class:`CaptureAttnProcessor`, which computes softmax probabilities
explicitly and keeps them in the autograd graph (no clone, no detach) so the
token and pixel losses back-propagate into the U-Net. Every other layer keeps
diffusers' fused SDPA processor: the 64x64 self-attention maps that the
reference code materialises are never built.

State lives in the :class:`AttentionCapture` instance, keyed by layer name, and
each forward replaces that layer's entry: a gradient-checkpointing recompute
overwrites instead of appending, so maps are never duplicated or stale.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention

PARTS = ("down", "mid", "up")


def _block_resolutions(unet: torch.nn.Module, sample_size: int) -> list[tuple[str, str, int]]:
    """(module prefix, part, latent side) for each U-Net block, in forward order.

    The side halves after every down block that has a downsampler and doubles
    after every up block that has an upsampler, so it follows the model's own
    structure instead of a table of known architectures.
    """
    blocks: list[tuple[str, str, int]] = []
    side = sample_size
    for index, block in enumerate(unet.down_blocks):
        blocks.append((f"down_blocks.{index}.", "down", side))
        if getattr(block, "downsamplers", None):
            side //= 2
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid_block.", "mid", side))
    for index, block in enumerate(unet.up_blocks):
        blocks.append((f"up_blocks.{index}.", "up", side))
        if getattr(block, "upsamplers", None):
            side *= 2
    return blocks


def supervised_groups(unet: torch.nn.Module, layers: list[str], sample_size: int) -> dict[str, list[str]]:
    """Supervised cross-attention layers grouped by U-Net part and resolution.

    ``layers`` picks parts ("down", "mid", "up"); ``sample_size`` is the latent
    side the U-Net runs at (64 for SD 1.4 at 512 px). Returns e.g.
    ``{"mid_8": [...], "up_16": [...], "up_32": [...], "up_64": [...]}`` mapping
    group names to ``attn2`` module names, in forward order.
    """
    unknown = set(layers) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown U-Net parts {sorted(unknown)}; choose from {PARTS}")
    blocks = _block_resolutions(unet, sample_size)
    groups: dict[str, list[str]] = {}
    for name, module in unet.named_modules():
        if not (isinstance(module, Attention) and module.is_cross_attention and name.endswith("attn2")):
            continue
        _, part, side = next(block for block in blocks if name.startswith(block[0]))
        if part in layers:
            groups.setdefault(f"{part}_{side}", []).append(name)
    return groups


class CaptureAttnProcessor:
    """diffusers' plain attention with the probabilities handed to a store.

    Same maths as ``AttnProcessor`` (explicit softmax, so the probabilities
    exist); ``store[name]`` receives a (B, heads, HW, T) view of them.
    """

    def __init__(self, name: str, store: dict[str, torch.Tensor]) -> None:
        self.name = name
        self.store = store

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)
        # (B*heads, HW, T) is batch-major (head_to_batch_dim), so this view is free.
        self.store[self.name] = probs.view(-1, attn.heads, probs.shape[1], probs.shape[2])

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class AttentionCapture:
    """Installs :class:`CaptureAttnProcessor` on the groups' layers only.

    ``maps()`` returns, per group, the (B, heads, HW, T) probabilities of each
    layer from the last forward pass; ``remove()`` restores the original
    processors.
    """

    def __init__(self, unet: torch.nn.Module, groups: dict[str, list[str]]) -> None:
        self.groups = {group: list(names) for group, names in groups.items()}
        self._store: dict[str, torch.Tensor] = {}
        modules = dict(unet.named_modules())
        self._originals: dict[str, tuple[Attention, object]] = {}
        for names in self.groups.values():
            for name in names:
                module = modules[name]
                self._originals[name] = (module, module.processor)
                module.set_processor(CaptureAttnProcessor(name, self._store))

    def maps(self) -> dict[str, list[torch.Tensor]]:
        missing = [name for names in self.groups.values() for name in names if name not in self._store]
        if missing:
            raise RuntimeError(f"no attention captured for {missing[:3]}...: run a forward pass first")
        return {group: [self._store[name] for name in names] for group, names in self.groups.items()}

    def clear(self) -> None:
        self._store.clear()

    def remove(self) -> None:
        for module, processor in self._originals.values():
            module.set_processor(processor)
        self._originals.clear()
        self._store.clear()

    def __enter__(self) -> "AttentionCapture":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
