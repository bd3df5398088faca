"""Cross-attention capture for the grounding losses.

Only the supervised cross-attention layers (``attn2`` of the chosen U-Net parts)
get :class:`CaptureAttnProcessor`. It computes the layer's output with the same
fused SDPA kernel as every other layer, and next to it the softmax probabilities
that the losses read, in the autograd graph (no clone, no detach) so the token
and pixel losses back-propagate into the U-Net. In training only the nouns'
token columns are exposed (:meth:`AttentionCapture.capture_tokens`), and they
are recomputed from the query and key in the backward pass instead of being
kept: the grounding step then holds no (B, heads, H*W, 77) tensor between the
forward and the backward pass, which is what made it cost more memory than a
plain step. The 64x64 self-attention maps that the reference code materialises
are never built.

State lives in the :class:`AttentionCapture` instance, keyed by layer name, and
each forward replaces that layer's entry: a gradient-checkpointing recompute
overwrites instead of appending, so maps are never duplicated or stale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def _scores(query: torch.Tensor, key: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    return scores if mask is None else scores + mask.float()


def _column_index(columns: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    batch, heads, length, _ = scores.shape
    return columns[:, None, None, :].expand(batch, heads, length, columns.shape[-1])


class _ColumnSoftmax(torch.autograd.Function):
    """softmax(q k^T * scale + mask) at chosen key columns; keeps only q, k and the
    log-sum-exp for the backward pass, which recomputes the scores."""

    @staticmethod
    def forward(ctx, query, key, scale, columns, mask):
        with torch.autocast(device_type=query.device.type, enabled=False):
            scores = _scores(query, key, scale, mask)
            lse = scores.logsumexp(-1, keepdim=True)
            probs = (scores.gather(-1, _column_index(columns, scores)) - lse).exp()
        ctx.scale = scale
        ctx.save_for_backward(query, key, columns, lse, mask)
        return probs

    @staticmethod
    def backward(ctx, grad):
        query, key, columns, lse, mask = ctx.saved_tensors
        with torch.autocast(device_type=query.device.type, enabled=False):
            probs = _scores(query, key, ctx.scale, mask).sub_(lse).exp_()  # every column, (B, h, L, T)
            index = _column_index(columns, probs)
            weighted = grad.float() * probs.gather(-1, index)
            # d softmax: p_j * (g_j - sum_c g_c p_c), with g_j summed over the columns that are j.
            dscores = probs.mul_(-weighted.sum(-1, keepdim=True)).scatter_add_(-1, index, weighted)
            dscores.mul_(ctx.scale)
            dquery = torch.matmul(dscores, key.float()).to(query.dtype)
            dkey = torch.matmul(dscores.transpose(-1, -2), query.float()).to(key.dtype)
        return dquery, dkey, None, None, None


def column_probabilities(query: torch.Tensor, key: torch.Tensor, scale: float, columns: torch.Tensor | None,
                         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) over all key tokens, in fp32, kept at ``columns`` only.

    query (B, heads, L, d), key (B, heads, T, d), columns (B, C) token indices or
    None for all T. Returns (B, heads, L, C). With gradients, nothing of size
    (B, heads, L, T) is kept for the backward pass, which recomputes the scores.
    """
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        if columns is None:
            columns = torch.arange(key.shape[-2], device=key.device).expand(key.shape[0], -1)
        return _ColumnSoftmax.apply(query, key, scale, columns, attention_mask)
    with torch.autocast(device_type=query.device.type, enabled=False):
        probs = _scores(query, key, scale, attention_mask).softmax(-1)
        return probs if columns is None else probs.gather(-1, _column_index(columns, probs))


class CaptureAttnProcessor:
    """diffusers' SDPA attention that also hands the softmax probabilities to its capture.

    The output is ``AttnProcessor2_0``'s. The probabilities, (B, heads, HW, C) for
    the capture's columns, come from :func:`column_probabilities`: for the backward
    pass it keeps only the query and key (which SDPA saves anyway) and recomputes
    the scores.
    """

    def __init__(self, name: str, capture: "AttentionCapture") -> None:
        self.name = name
        self.capture = capture

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
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        self.capture.store[self.name] = column_probabilities(query, key, attn.scale, self.capture.columns,
                                                             attention_mask)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class AttentionCapture:
    """Installs :class:`CaptureAttnProcessor` on the groups' layers only.

    ``maps()`` returns, per group, the (B, heads, HW, C) probabilities of each
    layer from the last forward pass: every token (C = T) unless
    :meth:`capture_tokens` chose the columns. ``remove()`` restores the original
    processors.
    """

    def __init__(self, unet: torch.nn.Module, groups: dict[str, list[str]]) -> None:
        self.groups = {group: list(names) for group, names in groups.items()}
        self.store: dict[str, torch.Tensor] = {}
        self.columns: torch.Tensor | None = None
        modules = dict(unet.named_modules())
        self._originals: dict[str, tuple[Attention, object]] = {}
        for names in self.groups.values():
            for name in names:
                module = modules[name]
                self._originals[name] = (module, module.processor)
                module.set_processor(CaptureAttnProcessor(name, self))

    def capture_tokens(self, token_positions: torch.Tensor | None) -> torch.Tensor | None:
        """Expose only these tokens' columns from the next forward pass on.

        ``token_positions`` (B, N, K), padded with -1, as ``losses.grounding_losses``
        takes them; returns the same nouns' positions within the captured columns,
        so ``grounding_losses(maps, masks, returned)`` equals
        ``grounding_losses(full_maps, masks, token_positions)``. None: every column.
        """
        if token_positions is None:
            self.columns = None
            return None
        batch, nouns, width = token_positions.shape
        self.columns = token_positions.reshape(batch, nouns * width).clamp(min=0)
        within = torch.arange(nouns * width, device=token_positions.device).view(1, nouns, width)
        return within.expand(batch, nouns, width).masked_fill(token_positions < 0, -1)

    def maps(self) -> dict[str, list[torch.Tensor]]:
        missing = [name for names in self.groups.values() for name in names if name not in self.store]
        if missing:
            raise RuntimeError(f"no attention captured for {missing[:3]}...: run a forward pass first")
        return {group: [self.store[name] for name in names] for group, names in self.groups.items()}

    def clear(self) -> None:
        self.store.clear()

    def remove(self) -> None:
        for module, processor in self._originals.values():
            module.set_processor(processor)
        self._originals.clear()
        self.store.clear()

    def __enter__(self) -> "AttentionCapture":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
