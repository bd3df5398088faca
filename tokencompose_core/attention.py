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

MMDiT models (SD 3 / 3.5, FLUX) have no cross-attention: image and text tokens
attend jointly. There the capture installs :class:`JointCaptureProcessor` (SD 3)
or :class:`FluxCaptureProcessor` (FLUX, double- and single-stream blocks) on the
supervised blocks' ``attn`` modules; they keep the fused kernel for the output and
store image query i's probability on text key j, softmax over all keys (text and
image) as the block computes it (:func:`lean_column_probabilities`): the kernel's
log-sum-exp is the normaliser, so only the chosen columns are computed, and the
backward pass is two fused attention products, never a (B, heads, image tokens,
all keys) tensor.

State lives in the :class:`AttentionCapture` instance, keyed by layer name, and
each forward replaces that layer's entry: a gradient-checkpointing recompute
overwrites instead of appending, so maps are never duplicated or stale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention
from torch.nn.attention import SDPBackend

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


# ----------------------------------------------------------------------------- MMDiT joint attention

_JOINT_STACKS = ("transformer_blocks", "single_transformer_blocks")


def _is_joint(module: torch.nn.Module) -> bool:
    """SD 3's joint ``Attention`` (text projections beside the image ones) or any FLUX attention
    (a single-stream block gets text and image tokens already concatenated)."""
    if isinstance(module, FluxAttention):
        return True
    return isinstance(module, Attention) and module.added_kv_proj_dim is not None


def mmdit_blocks(transformer: torch.nn.Module) -> list[str]:
    """Every block of an SD 3 or FLUX transformer whose ``attn`` is joint, in forward order
    (``transformer_blocks.0``, ..., ``single_transformer_blocks.37``)."""
    return [name.removesuffix(".attn") for name, module in transformer.named_modules()
            if name.startswith(_JOINT_STACKS) and name.endswith(".attn") and _is_joint(module)]


def mmdit_groups(transformer: torch.nn.Module, blocks: list[str]) -> dict[str, list[str]]:
    """One group per supervised block (``train.grounding.blocks``): ``{block: [f"{block}.attn"]}``,
    so that losses can be weighed and mIoU reported per block."""
    valid = mmdit_blocks(transformer)
    unknown = [block for block in blocks if block not in valid]
    if unknown:
        raise ValueError(f"unknown joint attention blocks {unknown}; this transformer has {valid}")
    return {block: [f"{block}.attn"] for block in blocks}


def _lse_view(lse: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    # The memory-efficient kernel pads its log-sum-exp rows to a multiple of 32, cuDNN adds a last dim of 1.
    return lse.reshape(*query.shape[:2], -1)[..., : query.shape[2]]


def fused_attention(query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.scaled_dot_product_attention(query, key, value)`` and its log-sum-exp (B, heads, L) over the keys.

    Calls the kernel SDPA itself would choose, with the same arguments, so the output
    is SDPA's; the log-sum-exp is the one that kernel computes anyway. None where
    SDPA would pad the head dimension or fall back to the math path.
    """
    choice = torch._fused_sdp_choice(query, key, value, None, 0.0, False)
    aten = torch.ops.aten
    if choice == SDPBackend.FLASH_ATTENTION.value and query.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu(query, key, value)
    if query.shape[-1] % 8 == 0:
        if choice == SDPBackend.FLASH_ATTENTION.value:
            output, lse = aten._scaled_dot_product_flash_attention(query, key, value)[:2]
            return output, _lse_view(lse, query)
        if choice == SDPBackend.EFFICIENT_ATTENTION.value:
            output, lse = aten._scaled_dot_product_efficient_attention(query, key, value, None, True)[:2]
            return output, _lse_view(lse, query)
        if choice == SDPBackend.CUDNN_ATTENTION.value:
            output, lse = aten._scaled_dot_product_cudnn_attention(query, key, value, None, True)[:2]
            return output, _lse_view(lse, query)
    return F.scaled_dot_product_attention(query, key, value), None


@torch.no_grad()
def _logsumexp(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """log-sum-exp of the scores over the keys, in row chunks of about 64 Mi scores."""
    rows = max(1, 2**26 // (query.shape[0] * query.shape[1] * key.shape[2]))
    with torch.autocast(device_type=query.device.type, enabled=False):
        return torch.cat([_scores(chunk, key, scale, None).logsumexp(-1) for chunk in query.split(rows, dim=2)], 2)


def _key_index(columns: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    batch, heads, _, dim = key.shape
    return columns[:, None, :, None].expand(batch, heads, columns.shape[-1], dim)


def _spread_by_value_gradient(query: torch.Tensor, key: torch.Tensor, weights: torch.Tensor,
                              lse: torch.Tensor, scale: float) -> torch.Tensor:
    """P^T weights as the gradient of attention(query, key, V) with respect to V (one fused forward
    and backward pass; the backward also computes the query's and key's gradients, unused). The
    kernel recomputes the normaliser, so ``lse`` is not needed here."""
    with torch.enable_grad():
        values = key.detach().requires_grad_()
        attended = F.scaled_dot_product_attention(query.detach(), key.detach(), values, scale=scale)
        (spread,) = torch.autograd.grad(attended, values, weights)
    return spread


def _spread_by_transposed_attention(query: torch.Tensor, key: torch.Tensor, weights: torch.Tensor,
                                    lse: torch.Tensor, scale: float) -> torch.Tensor:
    """P^T weights as the keys attending over the queries, one fused forward pass (half the cost of
    :func:`_spread_by_value_gradient`): an extra channel (1 on the keys' side, -lse_i / scale on
    the queries') makes the scores s_ij - lse_i, and the kernel hands back the log of the
    normaliser sum_i P_ij it divided key j's row by. CPU only: in fp32 (bias channels lose
    precision in bf16), and CPU flash is the fused kernel that returns that normaliser."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    asking = torch.cat([key.to(dtype), key.new_ones(*key.shape[:3], 1, dtype=dtype)], -1)
    answering = torch.cat([query.to(dtype), lse.to(dtype)[..., None].div(-scale)], -1)
    spread, log_total = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        asking, answering, F.pad(weights.to(dtype), (0, 1)), scale=scale)
    return spread[..., :-1] * log_total.exp()[..., None]


def _attention_products(query: torch.Tensor, key: torch.Tensor, weights: torch.Tensor, lse: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """P K and P^T weights for P = softmax(q k^T * scale) over all keys (log-sum-exp ``lse``), both
    with fused attention kernels: the first is attention with the keys as values."""
    with torch.no_grad():
        attended = F.scaled_dot_product_attention(query, key, key, scale=scale)
    spread = (_spread_by_transposed_attention if query.device.type == "cpu" else _spread_by_value_gradient)(
        query, key, weights, lse, scale)
    return attended, spread


class _LeanColumnSoftmax(torch.autograd.Function):
    """exp(q k_j * scale - lse) at the chosen key columns j, lse the log-sum-exp over all keys.

    Keeps q, k (which SDPA keeps too), the log-sum-exp and the (B, heads, L, C) probabilities. With
    G = dL/dP and W = G * P, c = sum_j W_j: dS = scatter(W) - c P (all keys), so
    dq = scale (W k_cols - c (P K)) and dk = scale (scatter(W^T q) - P^T (c q)), the
    two products over all keys coming from fused attention (:func:`_attention_products`).
    """

    @staticmethod
    def forward(ctx, query, key, lse, scale, columns):
        with torch.autocast(device_type=query.device.type, enabled=False):
            picked = key.gather(2, _key_index(columns, key))
            probs = _scores(query, picked, scale, None).sub_(lse.float()[..., None]).exp_()
        ctx.scale = scale
        ctx.save_for_backward(query, key, lse, columns, probs)
        return probs

    @staticmethod
    def backward(ctx, grad):
        query, key, lse, columns, probs = ctx.saved_tensors
        scale = ctx.scale
        with torch.autocast(device_type=query.device.type, enabled=False):
            weighted = grad.float() * probs
            total = weighted.sum(-1, keepdim=True)
            attended, spread = _attention_products(query, key, (total * query.float()).to(query.dtype), lse, scale)
            index = _key_index(columns, key)
            dquery = (weighted @ key.gather(2, index).float() - total * attended.float()).mul_(scale)
            dkey = spread.float().neg_().scatter_add_(2, index, weighted.transpose(-1, -2) @ query.float())
            dkey.mul_(scale)
        return dquery.to(query.dtype), dkey.to(key.dtype), None, None, None


def lean_column_probabilities(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scale: float,
                              columns: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) over all keys, given its log-sum-exp ``lse`` (B, heads, L), at ``columns``.

    query (B, heads, L, d), key (B, heads, T, d), columns (B, C) key indices.
    Returns (B, heads, L, C) fp32. Only these C columns are ever computed, forward
    and backward (:class:`_LeanColumnSoftmax`).
    """
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        return _LeanColumnSoftmax.apply(query, key, lse.detach(), scale, columns)
    with torch.autocast(device_type=query.device.type, enabled=False):
        picked = key.gather(2, _key_index(columns, key))
        return _scores(query, picked, scale, None).sub_(lse.float()[..., None]).exp_()


class JointCaptureProcessor:
    """SD 3 / 3.5's ``JointAttnProcessor2_0`` (joint [image, text] attention, qk-norm) that hands
    the query and key to its capture; the output comes from the same SDPA kernel."""

    def __init__(self, name: str, capture: "AttentionCapture") -> None:
        self.name = name
        self.capture = capture

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        batch, images = hidden_states.shape[:2]

        def heads(states: torch.Tensor) -> torch.Tensor:
            return states.view(batch, -1, attn.heads, states.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads(project(hidden_states)) for project in (attn.to_q, attn.to_k, attn.to_v))
        text_query, text_key, text_value = (heads(project(encoder_hidden_states))
                                            for project in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        query, key, value = (torch.cat(pair, dim=2) for pair in
                             ((query, text_query), (key, text_key), (value, text_value)))

        output, lse = fused_attention(query, key, value)
        self.capture.record(self.name, query, key, lse, slice(0, images), slice(images, None))
        output = output.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
        image_output, text_output = output[:, :images], output[:, images:]
        if not attn.context_pre_only:
            text_output = attn.to_add_out(text_output)
        return attn.to_out[1](attn.to_out[0](image_output)), text_output


class FluxCaptureProcessor:
    """FLUX's ``FluxAttnProcessor`` ([text, image] order, qk-norm, rotary embedding) that hands the
    query and key to its capture. The output is diffusers' native (torch SDPA) backend's. A
    single-stream block's text length comes from the capture, which reads it off the
    transformer's input."""

    def __init__(self, name: str, capture: "AttentionCapture") -> None:
        self.name = name
        self.capture = capture

    def __call__(self, attn: FluxAttention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if attention_mask is not None or attn.fused_projections:
            raise ValueError("the FLUX attention capture supports neither attention masks nor fused projections")

        def heads(states: torch.Tensor) -> torch.Tensor:
            return states.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(heads(attn.to_q(hidden_states)))
        key = attn.norm_k(heads(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
        joint = encoder_hidden_states is not None
        if joint:
            query = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), key], dim=1)
            value = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        texts = encoder_hidden_states.shape[1] if joint else self.capture.text_length
        if texts is None:
            raise RuntimeError(f"{self.name}: the text length comes from the transformer's forward; "
                               "call the transformer, not the block")
        query, key, value = (states.transpose(1, 2) for states in (query, key, value))
        output, lse = fused_attention(query, key, value)
        self.capture.record(self.name, query, key, lse, slice(texts, None), slice(0, texts))
        output = output.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if not joint:
            return output
        text_output, image_output = output.split_with_sizes([texts, output.shape[1] - texts], dim=1)
        image_output = attn.to_out[1](attn.to_out[0](image_output.contiguous()))
        return image_output, attn.to_add_out(text_output.contiguous())


def _capture_processor(name: str, module: torch.nn.Module | None, capture: "AttentionCapture") -> object:
    if module is not None and _is_joint(module):
        return (FluxCaptureProcessor if isinstance(module, FluxAttention) else JointCaptureProcessor)(name, capture)
    if isinstance(module, Attention) and module.is_cross_attention:
        return CaptureAttnProcessor(name, capture)
    kind = "no such module" if module is None else f"{type(module).__name__} has no text keys and no joint sequence"
    raise ValueError(f"cannot capture attention of {name!r}: {kind}")


class AttentionCapture:
    """Installs a capturing processor on the groups' layers only.

    ``model`` is a U-Net (the groups name cross-attention ``attn2`` modules) or an
    SD 3 / FLUX transformer (the groups name joint ``attn`` modules, e.g. from
    :func:`mmdit_groups`). ``maps()`` returns, per group, each layer's probabilities
    from the last forward pass: (B, heads, HW, C) for a U-Net, (B, heads, image
    tokens, C) over the joint attention's text segment for a transformer, with
    C = every text token unless :meth:`capture_tokens` chose the columns.
    ``text_only`` (transformers only) renormalises over the text keys instead of
    all keys. ``remove()`` restores the original processors.
    """

    def __init__(self, model: torch.nn.Module, groups: dict[str, list[str]], text_only: bool = False) -> None:
        self.groups = {group: list(names) for group, names in groups.items()}
        self.text_only = text_only
        self.store: dict[str, torch.Tensor] = {}
        self.columns: torch.Tensor | None = None
        self.text_length: int | None = None  # of the running forward pass; FLUX's single-stream blocks need it
        modules = dict(model.named_modules())
        self._originals: dict[str, tuple[torch.nn.Module, object]] = {}
        for names in self.groups.values():
            for name in names:
                processor = _capture_processor(name, modules.get(name), self)
                self._originals[name] = (modules[name], modules[name].processor)
                modules[name].set_processor(processor)
        flux = any(isinstance(module, FluxAttention) for module, _ in self._originals.values())
        self._hook = model.register_forward_pre_hook(self._read_text_length, with_kwargs=True) if flux else None

    def _read_text_length(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)  # FLUX's forward order
        self.text_length = None if text is None else text.shape[1]

    def record(self, name: str, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor | None,
               image: slice, text: slice) -> None:
        """Store a joint attention's map: image queries' probabilities at the captured text columns.

        query and key (B, heads, tokens, d) as the block attends (after qk-norm and
        rotary embedding); ``lse`` the kernel's log-sum-exp over all keys (B, heads,
        tokens) or None; ``image`` and ``text`` the two segments of the joint sequence.
        """
        image_query, text_key = query[:, :, image], key[:, :, text]
        columns = self.columns
        if columns is None:
            columns = torch.arange(text_key.shape[2], device=key.device).expand(key.shape[0], -1)
        scale = query.shape[-1] ** -0.5  # SDPA's default, which both stock processors use
        if self.text_only:
            key, lse = text_key, _logsumexp(image_query, text_key, scale)
        else:
            columns = columns + text.start
            lse = _logsumexp(image_query, key, scale) if lse is None else lse[:, :, image]
        self.store[name] = lean_column_probabilities(image_query, key, lse, scale, columns)

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
        if self._hook is not None:
            self._hook.remove()
        self.store.clear()

    def __enter__(self) -> "AttentionCapture":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
