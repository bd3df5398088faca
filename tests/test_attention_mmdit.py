"""The joint-attention capture of SD 3 and FLUX transformers against an explicit softmax over all keys."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from tokencompose_core.attention import (
    AttentionCapture,
    FluxCaptureProcessor,
    JointCaptureProcessor,
    _spread_by_transposed_attention,
    _spread_by_value_gradient,
    lean_column_probabilities,
    mmdit_blocks,
    mmdit_groups,
)
from tokencompose_core.losses import grounding_losses

IMAGE_SIDE, TEXT_TOKENS, BATCH = 4, 6, 2  # 4x4 image tokens after patching


def _sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
    )


def _flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
    )


def _inputs(family: str) -> dict:
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(BATCH, TEXT_TOKENS, 12, generator=generator)
    pooled = torch.randn(BATCH, 8, generator=generator)
    timestep = torch.tensor([0.3, 0.8])
    if family == "sd3":
        latents = torch.randn(BATCH, 4, 2 * IMAGE_SIDE, 2 * IMAGE_SIDE, generator=generator)
        return dict(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep)
    rows, cols = torch.meshgrid(torch.arange(IMAGE_SIDE), torch.arange(IMAGE_SIDE), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).flatten(0, 1).float()
    return dict(hidden_states=torch.randn(BATCH, IMAGE_SIDE**2, 8, generator=generator),
                encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep,
                img_ids=img_ids, txt_ids=torch.zeros(TEXT_TOKENS, 3))


def _model(family: str):
    return _sd3() if family == "sd3" else _flux()


def _blocks(family: str) -> list[str]:
    if family == "sd3":  # block 0 has the image-only attn2 beside its joint attn; block 2 is context_pre_only
        return ["transformer_blocks.0", "transformer_blocks.2"]
    return ["transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]


# ------------------------------------------------------------------ the explicit reference, from the module's q/k


def _heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    return states.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, tokens, d)


def _sd3_query_key(attn, kwargs):
    image, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
    query = torch.cat([attn.norm_q(_heads(attn.to_q(image), attn.heads)),
                       attn.norm_added_q(_heads(attn.add_q_proj(text), attn.heads))], 2)
    key = torch.cat([attn.norm_k(_heads(attn.to_k(image), attn.heads)),
                     attn.norm_added_k(_heads(attn.add_k_proj(text), attn.heads))], 2)
    return query, key, slice(0, image.shape[1]), slice(image.shape[1], None)


def _flux_query_key(attn, kwargs):
    states, text = kwargs["hidden_states"], kwargs.get("encoder_hidden_states")
    query = attn.norm_q(attn.to_q(states).unflatten(-1, (attn.heads, -1)))
    key = attn.norm_k(attn.to_k(states).unflatten(-1, (attn.heads, -1)))
    if text is not None:  # double-stream: [text, image]
        query = torch.cat([attn.norm_added_q(attn.add_q_proj(text).unflatten(-1, (attn.heads, -1))), query], 1)
        key = torch.cat([attn.norm_added_k(attn.add_k_proj(text).unflatten(-1, (attn.heads, -1))), key], 1)
    rotary = kwargs["image_rotary_emb"]
    query = apply_rotary_emb(query, rotary, sequence_dim=1).transpose(1, 2)
    key = apply_rotary_emb(key, rotary, sequence_dim=1).transpose(1, 2)
    return query, key, slice(TEXT_TOKENS, None), slice(0, TEXT_TOKENS)


def _explicit_maps(family: str, model, names: list[str], text_only: bool = False) -> dict[str, torch.Tensor]:
    """Hooks that rebuild each supervised module's q and k from its inputs, in the graph, and
    keep softmax(q k^T / sqrt(d)) over all keys (or the text keys), image rows, text columns."""
    maps, modules, handles = {}, dict(model.named_modules()), []
    query_key = _sd3_query_key if family == "sd3" else _flux_query_key

    def hook(name):
        def keep(module, args, kwargs, output):
            query, key, image, text = query_key(module, kwargs)
            if text_only:
                key = key[:, :, text]
            probs = (query[:, :, image] @ key.transpose(-1, -2) * query.shape[-1] ** -0.5).softmax(-1)
            maps[name] = probs if text_only else probs[..., text]
        return keep

    for name in names:
        handles.append(modules[name].register_forward_hook(hook(name), with_kwargs=True))
    return maps, handles


def _run(family: str, columns: torch.Tensor | None, explicit: bool, text_only: bool = False):
    """Maps, a weighted loss's parameter gradients and the output, with the capture or the explicit hooks."""
    model = _model(family)
    groups = mmdit_groups(model, _blocks(family))
    names = [name for names in groups.values() for name in names]
    weights = torch.randn(BATCH, 2, IMAGE_SIDE**2, TEXT_TOKENS if columns is None else columns.shape[1],
                          generator=torch.Generator().manual_seed(5))
    if explicit:
        store, handles = _explicit_maps(family, model, names, text_only)
    else:
        capture = AttentionCapture(model, groups, text_only=text_only)
        capture.columns = columns
    output = model(**_inputs(family)).sample
    if explicit:
        for handle in handles:
            handle.remove()
        maps = [store[name] if columns is None else store[name].gather(
            -1, columns[:, None, None, :].expand(-1, 2, IMAGE_SIDE**2, -1)) for name in names]
    else:
        maps = [layer for layers in capture.maps().values() for layer in layers]
        capture.remove()
    loss = sum((layer * weights).sum() for layer in maps)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return [layer.detach() for layer in maps], grads, output.detach()


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("columns", [None, torch.tensor([[1, 4, 4, 0], [5, 2, 3, 3]])],
                         ids=["every-column", "chosen-columns"])
def test_captured_columns_and_gradients_equal_an_explicit_softmax_over_all_keys(family, columns):
    maps, grads, output = _run(family, columns, explicit=False)
    want_maps, want_grads, want_output = _run(family, columns, explicit=True)
    torch.testing.assert_close(output, want_output, rtol=0, atol=0)  # same kernels for the block outputs
    for got, want in zip(maps, want_maps):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert grads.keys() == want_grads.keys()
    # Reaches the text projections and the blocks upstream of the supervised ones.
    assert any("add_k_proj" in name for name in grads) and any(".0." in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_text_only_renormalisation_is_exact(family):
    columns = torch.tensor([[0, 2], [5, 5]])
    maps, grads, _ = _run(family, columns, explicit=False, text_only=True)
    want_maps, want_grads, _ = _run(family, columns, explicit=True, text_only=True)
    for got, want in zip(maps, want_maps):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lean_probabilities_and_gradients_match_the_explicit_softmax_in_fp32_and_bf16():
    # The reference runs in fp64 from the same (rounded) inputs; the capture computes in fp32.
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(2, 3, 40, 8, dtype=torch.float64, generator=generator)
    key = torch.randn(2, 3, 52, 8, dtype=torch.float64, generator=generator)
    columns = torch.tensor([[40, 41, 41, 50], [44, 51, 47, 40]])
    weights = torch.randn(2, 3, 40, 4, dtype=torch.float64, generator=generator)

    def explicit(q, k):
        probs = (q.double() @ k.double().transpose(-1, -2) * 8**-0.5).softmax(-1)
        return probs.gather(-1, columns[:, None, None, :].expand(2, 3, 40, 4))

    def lean(q, k):
        lse = (q.double() @ k.double().transpose(-1, -2) * 8**-0.5).logsumexp(-1)
        return lean_column_probabilities(q, k, lse, 8**-0.5, columns)

    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        q, k = (t.to(dtype).requires_grad_() for t in (query, key))
        ours = lean(q, k)
        got = torch.autograd.grad((ours * weights).sum(), (q, k))
        want = torch.autograd.grad((explicit(q, k) * weights).sum(), (q, k))
        assert (ours.double() - explicit(q, k).detach()).abs().max() <= tolerance * ours.max()
        for g, w in zip(got, want):
            scale = w.double().abs().max()
            assert (g.double() - w.double()).abs().max() <= tolerance * scale, dtype


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_processors_installed_and_removed_and_losses_run_on_the_maps(family):
    model = _model(family)
    blocks = mmdit_blocks(model)
    if family == "sd3":
        assert blocks == [f"transformer_blocks.{i}" for i in range(3)]  # attn2 (image-only) is no joint block
    else:
        assert blocks == ["transformer_blocks.0", "transformer_blocks.1",
                          "single_transformer_blocks.0", "single_transformer_blocks.1"]
    with pytest.raises(ValueError, match="unknown joint attention blocks"):
        mmdit_groups(model, ["transformer_blocks.7"])
    with pytest.raises(ValueError, match="cannot capture"):
        AttentionCapture(model, {"x": ["transformer_blocks.0.attn2" if family == "sd3" else "proj_out"]})
    with pytest.raises(ValueError, match="no such module"):
        AttentionCapture(model, {"x": ["transformer_blocks.9.attn"]})

    stock = JointAttnProcessor2_0 if family == "sd3" else FluxAttnProcessor
    ours = JointCaptureProcessor if family == "sd3" else FluxCaptureProcessor
    groups = mmdit_groups(model, _blocks(family))
    capture = AttentionCapture(model, groups)
    supervised = {name for names in groups.values() for name in names}
    for name, processor in model.attn_processors.items():
        assert isinstance(processor, ours if name.removesuffix(".processor") in supervised else stock), name

    positions = torch.tensor([[[1, 2], [4, -1]], [[3, -1], [-1, -1]]])
    within = capture.capture_tokens(positions)
    model(**_inputs(family)).sample.pow(2).mean().backward()
    masks = (torch.rand(BATCH, 2, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.5).to(torch.uint8)
    for layers in capture.maps().values():
        assert layers[0].shape == (BATCH, 2, IMAGE_SIDE**2, 4)
        token, pixel = grounding_losses(layers, masks, within)
        assert torch.isfinite(token) and torch.isfinite(pixel) and token.requires_grad
    capture.remove()
    assert all(isinstance(p, stock) for p in model.attn_processors.values())
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_gradient_checkpointing_recomputes_the_same_maps_and_gradients(family):
    positions = torch.tensor([[[1, 2]], [[3, -1]]])
    masks = (torch.rand(BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.5).to(torch.uint8)
    grads = []
    for checkpointing in (False, True):
        model = _model(family).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        groups = mmdit_groups(model, _blocks(family))
        with AttentionCapture(model, groups) as capture:
            within = capture.capture_tokens(positions)
            loss = model(**_inputs(family)).sample.pow(2).mean()
            for layers in capture.maps().values():
                token, pixel = grounding_losses(layers, masks, within)
                loss = loss + token + pixel
            loss.backward()
            assert len(capture.store) == len(groups)  # the recompute replaced entries, it added none
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_both_ways_of_the_backward_key_product_equal_p_transposed_times_weights(dtype, tolerance):
    # The CPU's transposed attention and the value gradient that other devices use.
    generator = torch.Generator().manual_seed(6)
    query, weights = (torch.randn(2, 3, 40, 8, generator=generator).to(dtype) for _ in range(2))
    key = torch.randn(2, 3, 52, 8, generator=generator).to(dtype)
    scores = query.double() @ key.double().transpose(-1, -2) * 8**-0.5
    lse = scores.logsumexp(-1)
    want = (scores - lse[..., None]).exp().transpose(-1, -2) @ weights.double()
    for spread in (_spread_by_transposed_attention, _spread_by_value_gradient):
        got = spread(query, key, weights, lse.float(), 8**-0.5).double()
        assert (got - want).abs().max() <= tolerance * want.abs().max(), spread.__name__


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cuda_bf16_capture_keeps_the_output_and_matches_the_explicit_softmax(family):
    # The log-sum-exp from the kernel SDPA picks on the GPU, and the value-gradient backward.
    model = _model(family).cuda()
    inputs = {name: value.cuda() for name, value in _inputs(family).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        stock = model(**inputs).sample
        groups = mmdit_groups(model, _blocks(family))
        names = [name for names in groups.values() for name in names]
        store, handles = _explicit_maps(family, model, names)  # same forward, rebuilt from the module's inputs
        with AttentionCapture(model, groups) as capture:
            output = model(**inputs).sample
            maps = [layers[0] for layers in capture.maps().values()]
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(output, stock, rtol=0, atol=0)
    weights = torch.randn(maps[0].shape, generator=torch.Generator().manual_seed(5)).cuda()
    parameters = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(sum((m * weights).sum() for m in maps), parameters, retain_graph=True,
                              allow_unused=True)
    want = torch.autograd.grad(sum((store[n].float() * weights).sum() for n in names), parameters,
                               allow_unused=True)
    for ours, explicit in zip(maps, (store[n] for n in names)):
        torch.testing.assert_close(ours, explicit.float(), rtol=0.05, atol=2e-3)
    for g, w in zip(got, want):
        if w is not None:
            assert (g - w).abs().max() <= 0.05 * w.abs().max() + 1e-6
