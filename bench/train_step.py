"""Cost of the grounding losses: one training step, three ways, same model and batch.

(a) plain fine-tune: denoising loss, diffusers' fused SDPA attention everywhere;
(b) ours: + token/pixel losses, probabilities of the nouns' token columns
    captured in-graph only for the supervised cross-attention layers and
    recomputed in the backward pass (tokencompose_core.attention);
(c) reference style: every self- and cross-attention layer non-fused, every
    map cloned into a store each step, losses from the stored maps; for an
    MMDiT transformer, the explicit all-maps capture: the supervised blocks'
    softmax over all keys, (B, heads, image tokens, all keys), materialised in
    the graph (fused SDPA still gives the block outputs).

Each for a full fine-tune and, with ``--modes full lora``, for LoRA adapters of
``--lora-rank`` on the attention projections (tokencompose_core.lora; the base
frozen, the optimizer over the adapters).

CPU (default): an SD 1.4-shaped U-Net (same blocks, heads and attention sizes,
channels narrowed to 64/128/256/256) at latent 64 (512 px), batch 1 and 4;
``--arch sdxl``: an SDXL-shaped U-Net (attention at the two lowest-resolution
levels only, 1/2/10 transformer layers, two-encoder 2048-d context, pooled text
and add_time_ids through ``text_time``, channels narrowed to 32/64/128) at
latent 128 (1024 px); ``--arch sd35``: an SD 3.5 medium-shaped MMDiT
(``SD3Transformer2DModel``: 64-d heads, qk rms-norm, dual attention in the
first half of the blocks) narrowed to 4 blocks of 2 heads, at 1024 px (64x64
image tokens after patching, 77 + 256 text tokens), a flow-matching loss, the
supervised blocks from ``--blocks``. Memory is the peak resident set above the pre-model
baseline (the process re-executes itself with a fixed malloc mmap threshold so
freed tensors leave the RSS). ``--device cuda --full``: the full-size U-Net
(random weights), bf16 autocast, peak ``torch.cuda.max_memory_allocated``.

    python bench/train_step.py --out bench-train-step.json
    python bench/train_step.py --mask-side 512 --variants plain ours   # the paper profiles' 512x512 masks
    python bench/train_step.py --arch sdxl --modes full lora --steps 2
    python bench/train_step.py --device cuda --full --out train_step.json
    python bench/train_step.py --arch sd35 --modes full lora --steps 3
    python bench/train_step.py --arch sd35 --device cuda --full --modes full lora --lora-rank 64

Imports neither Prefect nor the pipeline configuration.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import SD3Transformer2DModel, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402

from tokencompose_core import lora  # noqa: E402
from tokencompose_core.attention import AttentionCapture, mmdit_groups, supervised_groups  # noqa: E402
from tokencompose_core.config import LoraAdapterConfig  # noqa: E402
from tokencompose_core.losses import grounding_losses  # noqa: E402

SD14_UNET = dict(
    sample_size=64,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,  # diffusers' name for the 8 heads of SD 1.x
)
# SDXL base's U-Net: no attention at the highest resolution, 2 and 10 transformer layers at
# the two lower ones (10 in the mid block), 64-d heads (diffusers names the head counts
# attention_head_dim), context = CLIP-L 768 + OpenCLIP-bigG 1280, and the pooled bigG
# embedding plus six size/crop numbers (add_time_ids) added to the time embedding.
SDXL_UNET = dict(
    sample_size=128,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=1280 + 6 * 256,
)
SDXL_POOLED_DIM = 1280
# Stable Diffusion 3.5 medium's transformer (MMDiT-X): 24 joint blocks of 24 64-d heads, the
# first 13 with a second, image-only attention; qk rms-norm; CLIP-L + bigG pooled (2048) and
# a T5-XXL-width context (4096) of 77 CLIP + 256 T5 tokens; 16 latent channels, 2x2 patches.
SD35_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
SD35_TEXT_TOKENS = 77 + 256
# CPU widths: every block, layer and attention size kept, channels narrowed (heads too for SDXL);
# SD 3.5: 4 blocks (2 with dual attention), 2 heads of 64, at the full 1024 px token count.
NARROW = {"sd14": {"block_out_channels": [64, 128, 256, 256]},
          "sdxl": {"block_out_channels": [32, 64, 128], "attention_head_dim": [1, 2, 4]},
          "sd35": {"num_layers": 4, "num_attention_heads": 2, "caption_projection_dim": 128,
                   "joint_attention_dim": 256, "pooled_projection_dim": 256, "dual_attention_layers": (0, 1)}}
# Supervised blocks: a sixth of SD 3.5's 24 in the middle of the stack; one of the narrow 4.
SD35_BLOCKS = {True: [f"transformer_blocks.{i}" for i in range(10, 14)], False: ["transformer_blocks.2"]}
# LoRA on a transformer: the image and the text streams' attention projections.
MMDIT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
TOKEN_WEIGHT, PIXEL_WEIGHT = 1e-3, 5e-5
_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
MODES = ["full", "lora"]


class ReferenceStyleProcessor:
    """Non-fused attention that clones every probability map into a shared list."""

    def __init__(self, name: str, store: dict[str, list[torch.Tensor]]) -> None:
        self.name, self.store = name, store

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        batch, tokens, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)
        self.store.setdefault(self.name, []).append(probs.clone().view(batch, attn.heads, tokens, -1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def unet_config(arch: str, full: bool) -> dict:
    if arch == "sdxl":
        return dict(SDXL_UNET) if full else {**SDXL_UNET, **NARROW[arch]}
    sd14 = Path(__file__).resolve().parents[1] / "configs" / "models" / "sd14-random" / "unet" / "config.json"
    if full:
        return json.loads(sd14.read_text()) if sd14.is_file() else dict(SD14_UNET)
    return {**SD14_UNET, **NARROW[arch]}


def build_model(arch: str, full: bool, device: torch.device, latent: int | None = None) -> torch.nn.Module:
    """The U-Net, or for ``sd35`` the transformer, with random weights, in training mode."""
    if arch == "sd35":
        config, model_class = dict(SD35_TRANSFORMER) if full else {**SD35_TRANSFORMER, **NARROW[arch]}, \
            SD3Transformer2DModel
    else:
        config, model_class = unet_config(arch, full), UNet2DConditionModel
    config["sample_size"] = latent or config["sample_size"]
    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the device: seconds, not a minute
        return model_class.from_config(config).train()


def is_transformer(model: torch.nn.Module) -> bool:
    return isinstance(model, SD3Transformer2DModel)


def attention_side(model: torch.nn.Module) -> int:
    """The side of the attention maps at the finest level: the latent side, or the patch grid's."""
    return model.config.sample_size // (model.config.patch_size if is_transformer(model) else 1)


def _masks(batch: int, mask_side: int, generator: torch.Generator) -> torch.Tensor:
    masks = torch.zeros(batch, 3, mask_side, mask_side, dtype=torch.uint8)
    scale, size = mask_side / 64, round(24 * mask_side / 64)
    for b in range(batch):
        for i in range(3):
            y, x = (torch.randint(0, 40, (2,), generator=generator) * scale).long().tolist()
            masks[b, i, y : y + size, x : x + size] = 1
    return masks


def make_transformer_batch(model: SD3Transformer2DModel, batch: int, device: torch.device, mask_side: int) -> dict:
    """Latents, noise and flow-matching times, a 77 + 256 token context and pooled text; nouns with
    CLIP and T5 tokens at their columns of the joint attention's text segment (T5 from 77 on)."""
    generator = torch.Generator().manual_seed(1)
    latent, config = model.config.sample_size, model.config
    return {
        "latents": torch.randn(batch, config.in_channels, latent, latent, generator=generator).to(device),
        "noise": torch.randn(batch, config.in_channels, latent, latent, generator=generator).to(device),
        "sigmas": torch.rand(batch, generator=generator).to(device),
        "text": torch.randn(batch, SD35_TEXT_TOKENS, config.joint_attention_dim, generator=generator).to(device),
        "pooled": torch.randn(batch, config.pooled_projection_dim, generator=generator).to(device),
        "masks": _masks(batch, mask_side, generator).to(device),
        "positions": torch.tensor([[[1, 78, -1, -1], [3, 4, 80, 81], [6, 83, -1, -1]]] * batch, device=device),
    }


def make_batch(unet: UNet2DConditionModel, batch: int, device: torch.device, mask_side: int = 64) -> dict:
    """Three square masks per sample at ``mask_side`` (the latent side: the latent grid; 8x it:
    train.mask_transform training_resolution), the same squares whatever the side; SDXL's
    pooled text embedding and add_time_ids (original size, crop corner, target size)."""
    if is_transformer(unet):
        return make_transformer_batch(unet, batch, device, mask_side)
    generator = torch.Generator().manual_seed(1)
    latent = unet.config.sample_size
    masks = _masks(batch, mask_side, generator)
    inputs = {
        "latents": torch.randn(batch, 4, latent, latent, generator=generator).to(device),
        "timesteps": torch.randint(0, 1000, (batch,), generator=generator).to(device),
        "text": torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator).to(device),
        "masks": masks.to(device),
        "positions": torch.tensor([[[1, -1], [3, 4], [6, -1]]] * batch, device=device),
        "added": None,
    }
    if unet.config.addition_embed_type == "text_time":
        pixels = latent * 8
        inputs["added"] = {
            "text_embeds": torch.randn(batch, SDXL_POOLED_DIM, generator=generator).to(device),
            "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * batch, dtype=torch.float32,
                                     device=device),
        }
    return inputs


def _grounding(maps: dict[str, list[torch.Tensor]], masks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    total = 0.0
    for layers in maps.values():
        token, pixel = grounding_losses(layers, masks, positions)
        total = total + TOKEN_WEIGHT * token + PIXEL_WEIGHT * pixel
    return total


class ExplicitCapture(AttentionCapture):
    """(c) on a transformer: each supervised block's softmax over all keys, (B, heads, image
    tokens, all keys) in fp32, materialised and kept in the graph; the chosen columns read from it."""

    def record(self, name: str, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor | None,
               image: slice, text: slice) -> None:
        with torch.autocast(device_type=query.device.type, enabled=False):
            probs = (query[:, :, image].float() @ key.float().transpose(-1, -2) * query.shape[-1] ** -0.5).softmax(-1)
        columns = self.columns + text.start
        self.store[name] = probs.gather(-1, columns[:, None, None, :].expand(*probs.shape[:3], -1))


def _denoising_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The U-Net rows' MSE to the latents; a transformer's flow matching (velocity noise - x at
    x_t = (1 - t) x + t noise), as SD 3 and FLUX train."""
    if not is_transformer(model):
        prediction = model(inputs["latents"], inputs["timesteps"], inputs["text"],
                           added_cond_kwargs=inputs["added"]).sample
        return F.mse_loss(prediction.float(), inputs["latents"].float())
    sigmas = inputs["sigmas"][:, None, None, None]
    noisy = (1 - sigmas) * inputs["latents"] + sigmas * inputs["noise"]
    prediction = model(noisy, inputs["text"], inputs["pooled"], inputs["sigmas"] * 1000).sample
    return F.mse_loss(prediction.float(), (inputs["noise"] - inputs["latents"]).float())


class Variant:
    """Installs one way of computing the loss on the model; ``loss`` runs the forward."""

    def __init__(self, name: str, unet: torch.nn.Module, groups: dict[str, list[str]]) -> None:
        self.name, self.unet, self.groups = name, unet, groups
        self.original = unet.attn_processors
        self.capture = None
        if name == "ours":
            self.capture = AttentionCapture(unet, groups)
        elif name == "reference" and is_transformer(unet):
            self.capture = ExplicitCapture(unet, groups)
        self.store: dict[str, list[torch.Tensor]] = {}
        if name == "reference" and self.capture is None:
            unet.set_attn_processor({key: ReferenceStyleProcessor(key.removesuffix(".processor"), self.store)
                                     for key in self.original})

    def loss(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.store.clear()
        positions = inputs["positions"]
        if self.capture is not None:  # as the training step does: the nouns' columns only
            positions = self.capture.capture_tokens(positions)
        loss = _denoising_loss(self.unet, inputs)
        if self.capture is not None:
            loss = loss + _grounding(self.capture.maps(), inputs["masks"], positions)
        elif self.name == "reference":
            maps = {group: [self.store[name][-1] for name in names] for group, names in self.groups.items()}
            loss = loss + _grounding(maps, inputs["masks"], positions)
        return loss

    def close(self) -> None:
        if self.capture is not None:
            self.capture.remove()
        self.unet.set_attn_processor(self.original)
        self.store.clear()


# ----------------------------------------------------------------------------- memory


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_cpu_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS may keep freed memory, numbers are upper bounds
        pass


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _release_cpu_memory()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _peak(device: torch.device, baseline: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return _rss_bytes("VmHWM") - baseline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_extra_bytes(unet: torch.nn.Module, batch: int, element: int, groups: dict[str, list[str]]) -> int:
    """What (c) adds: every attention map cloned and saved for backward (self-attention dominates);
    on a transformer, each supervised block's fp32 map over all keys, and the softmax's gradient."""
    if is_transformer(unet):
        images = attention_side(unet) ** 2
        heads = unet.config.num_attention_heads
        return 2 * len(groups) * batch * heads * images * (images + SD35_TEXT_TOKENS) * 4
    side = {name: int(group.split("_")[1]) for group, names in supervised_groups(
        unet, ["down", "mid", "up"], unet.config.sample_size).items() for name in names}
    total = 0
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.endswith("attn1"):
            pixels = side[name[: -1] + "2"] ** 2
            total += 2 * batch * module.heads * pixels * pixels * element
    return total


def _one_step(variant: Variant, optimizer: torch.optim.Optimizer, inputs: dict, device: torch.device,
              autocast_dtype: torch.dtype | None) -> tuple[float, float]:
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = variant.loss(inputs)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def measure(names: list[str], unet, groups, inputs, device, steps: int, warmup: int, baseline: int,
            autocast_dtype: torch.dtype | None) -> dict[str, dict]:
    """Time the variants in turns, one step each per round, so that a machine getting
    slower or faster (other jobs, clock changes) weighs on every variant alike; the
    median of each variant's steps, and its peak memory over its own steps."""
    # One optimizer over what trains (every parameter, or the LoRA adapters alone): its
    # state exists for every variant alike once the warm-up round has run.
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-6)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    peaks = dict.fromkeys(names, 0)
    for round_index in range(warmup + steps):
        shift = round_index % len(names)  # each variant goes first in turn: no seat is favoured
        for name in names[shift:] + names[:shift]:
            variant = Variant(name, unet, groups)
            try:
                _reset_peak(device)
                wall, cpu = _one_step(variant, optimizer, inputs, device, autocast_dtype)
                if round_index >= warmup:
                    times[name].append(wall)
                    cpu_times[name].append(cpu)
                    peaks[name] = max(peaks[name], _peak(device, baseline))
            finally:
                variant.close()
    del optimizer
    # Process CPU time is reported too: on a shared CPU machine it is less noisy than wall time.
    return {name: {"step_s": statistics.median(times[name]), "step_s_all": times[name],
                   "cpu_s": statistics.median(cpu_times[name]), "peak_bytes": peaks[name]} for name in names}


def measure_batches(args: argparse.Namespace, mode: str, unet, groups, device, baseline: int,
                    autocast_dtype: torch.dtype | None) -> dict:
    """Every variant at every batch size, with its ratios to plain of the same batch."""
    element = 2 if autocast_dtype is not None else 4
    batches = {}
    for batch in args.batches:
        inputs = make_batch(unet, batch, device, args.mask_side or attention_side(unet))
        rows, timed = {}, []
        for name in args.variants:
            needed = reference_extra_bytes(unet, batch, element, groups) if name == "reference" else 0
            available = _available_bytes(device)
            if needed > 0.6 * available:  # an out-of-memory error would lose every later row
                rows[name] = {"skipped": f"needs ~{needed / 2**30:.1f} GiB more than (a); "
                                         f"{available / 2**30:.1f} GiB available"}
            else:
                timed.append(name)
        rows.update(measure(timed, unet, groups, inputs, device, args.steps, args.warmup, baseline, autocast_dtype))
        for name in timed:
            print(f"{mode} batch {batch} {name}: {rows[name]['step_s']:.3f} s/step "
                  f"({rows[name]['cpu_s']:.3f} s CPU), {rows[name]['peak_bytes'] / 2**20:.0f} MiB", flush=True)
        plain = rows["plain"]
        for name in set(timed) - {"plain"}:
            rows[name]["time_vs_plain"] = round(rows[name]["step_s"] / plain["step_s"], 3)
            rows[name]["cpu_time_vs_plain"] = round(rows[name]["cpu_s"] / plain["cpu_s"], 3)
            rows[name]["memory_vs_plain"] = round(rows[name]["peak_bytes"] / plain["peak_bytes"], 3)
        batches[str(batch)] = rows
        del inputs
    return batches


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    _release_cpu_memory()
    baseline = 0 if device.type == "cuda" else _rss_bytes("VmRSS")
    unet = build_model(args.arch, args.full, device, args.latent)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    latent = unet.config.sample_size
    if is_transformer(unet):
        groups = mmdit_groups(unet, args.blocks or SD35_BLOCKS[args.full])
        shape = {"blocks": unet.config.num_layers, "heads": unet.config.num_attention_heads,
                 "head_dim": unet.config.attention_head_dim, "image_tokens": attention_side(unet) ** 2,
                 "text_tokens": SD35_TEXT_TOKENS}
    else:
        groups = supervised_groups(unet, ["mid", "up"], latent)
        shape = {"channels": unet.config.block_out_channels}
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    results: dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "arch": args.arch, "full_size": args.full,
        "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        **shape, "latent": latent,
        "mask_side": args.mask_side or attention_side(unet), "dtype": str(autocast_dtype or torch.float32),
        "gradient_checkpointing": args.gradient_checkpointing, "supervised_groups": {g: len(n) for g, n in groups.items()},
        "memory": "peak torch.cuda.max_memory_allocated" if device.type == "cuda"
        else "peak RSS (VmHWM) above the RSS before the model was built",
        "modes": {},
    }
    for mode in sorted(args.modes, key=MODES.index):  # full first: LoRA freezes the base for good
        if mode == "lora":
            targets = MMDIT_LORA_TARGETS if is_transformer(unet) else LoraAdapterConfig().target_modules
            lora.add_lora(unet, LoraAdapterConfig(rank=args.lora_rank, target_modules=targets))
        trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        results["modes"][mode] = {"trainable_params_m": round(trainable / 1e6, 3),
                                  "batches": measure_batches(args, mode, unet, groups, device, baseline,
                                                             autocast_dtype)}
    return results


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
    return _rss_bytes("VmRSS") + _meminfo_available()


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="sd14", choices=["sd14", "sdxl", "sd35"],
                        help="SD 1.4's U-Net at latent 64, SDXL's at latent 128, or SD 3.5 medium's transformer "
                             "at latent 128 (1024 px)")
    parser.add_argument("--blocks", nargs="+", default=None,
                        help="sd35: the supervised blocks (default: transformer_blocks.10-13 full-size, "
                             "transformer_blocks.2 narrow)")
    parser.add_argument("--full", action="store_true", help="full-size U-Net (meant for a GPU)")
    parser.add_argument("--modes", nargs="+", default=["full"], choices=MODES,
                        help="full fine-tune, LoRA adapters, or both (same model, full first)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--latent", type=int, default=None,
                        help="latent side (default: the architecture's, 64 for SD 1.4, 128 for SDXL and SD 3.5)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--mask-side", type=int, default=None,
                        help="mask side in the batch, a multiple of 64 (default: the latent side)")
    parser.add_argument("--variants", nargs="+", default=["plain", "ours", "reference"],
                        choices=["plain", "ours", "reference"], help="which steps to time; plain is the baseline")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if "plain" not in args.variants:
        parser.error("--variants needs plain: it is the baseline of every ratio")
    if args.device == "cpu" and _MMAP_ENV not in os.environ:
        # Large blocks from mmap go back to the OS when freed, so RSS follows live tensors.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, _MMAP_ENV: "1048576"})
    results = run(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
