"""Cost of the grounding losses: one training step, three ways, same model and batch.

(a) plain fine-tune: denoising loss, diffusers' fused SDPA attention everywhere;
(b) ours: + token/pixel losses, probabilities of the nouns' token columns
    captured in-graph only for the supervised cross-attention layers and
    recomputed in the backward pass (tokencompose_core.attention);
(c) reference style: every self- and cross-attention layer non-fused, every
    map cloned into a store each step, losses from the stored maps.

CPU (default): an SD 1.4-shaped U-Net (same blocks, heads and attention sizes,
channels narrowed to 64/128/256/256) at latent 64 (512 px), batch 1 and 4;
memory is the peak resident set above the pre-model baseline (the process
re-executes itself with a fixed malloc mmap threshold so freed tensors leave
the RSS). ``--device cuda --full``: the full-size SD 1.4 U-Net (random
weights), bf16 autocast, peak ``torch.cuda.max_memory_allocated``.

    python bench/train_step.py --out bench-train-step.json
    python bench/train_step.py --mask-side 512 --variants plain ours   # the paper profiles' 512x512 masks
    python bench/train_step.py --device cuda --full --out train_step.json

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

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402

from tokencompose_core.attention import AttentionCapture, supervised_groups  # noqa: E402
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
NARROW_CHANNELS = [64, 128, 256, 256]
TOKEN_WEIGHT, PIXEL_WEIGHT = 1e-3, 5e-5
_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


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


def build_unet(full: bool, device: torch.device) -> UNet2DConditionModel:
    arch = Path(__file__).resolve().parents[1] / "configs" / "models" / "sd14-random" / "unet" / "config.json"
    config = json.loads(arch.read_text()) if full and arch.is_file() else dict(SD14_UNET)
    if not full:
        config["block_out_channels"] = NARROW_CHANNELS
    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the device: seconds, not a minute
        return UNet2DConditionModel.from_config(config).train()


def make_batch(batch: int, device: torch.device, mask_side: int = 64) -> dict[str, torch.Tensor]:
    """Three square masks per sample at ``mask_side`` (64: the latent grid; 512: train.mask_transform
    training_resolution at 512 px), the same squares whatever the side."""
    generator = torch.Generator().manual_seed(1)
    masks = torch.zeros(batch, 3, mask_side, mask_side, dtype=torch.uint8)
    scale = mask_side // 64
    for b in range(batch):
        for i in range(3):
            y, x = (torch.randint(0, 40, (2,), generator=generator) * scale).tolist()
            masks[b, i, y : y + 24 * scale, x : x + 24 * scale] = 1
    return {
        "latents": torch.randn(batch, 4, 64, 64, generator=generator).to(device),
        "timesteps": torch.randint(0, 1000, (batch,), generator=generator).to(device),
        "text": torch.randn(batch, 77, 768, generator=generator).to(device),
        "masks": masks.to(device),
        "positions": torch.tensor([[[1, -1], [3, 4], [6, -1]]] * batch, device=device),
    }


def _grounding(maps: dict[str, list[torch.Tensor]], masks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    total = 0.0
    for layers in maps.values():
        token, pixel = grounding_losses(layers, masks, positions)
        total = total + TOKEN_WEIGHT * token + PIXEL_WEIGHT * pixel
    return total


class Variant:
    """Installs one way of computing the loss on the U-Net; ``loss`` runs the forward."""

    def __init__(self, name: str, unet: UNet2DConditionModel, groups: dict[str, list[str]]) -> None:
        self.name, self.unet, self.groups = name, unet, groups
        self.original = unet.attn_processors
        self.capture = AttentionCapture(unet, groups) if name == "ours" else None
        self.store: dict[str, list[torch.Tensor]] = {}
        if name == "reference":
            unet.set_attn_processor({key: ReferenceStyleProcessor(key.removesuffix(".processor"), self.store)
                                     for key in self.original})

    def loss(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.store.clear()
        positions = inputs["positions"]
        if self.capture is not None:  # as the training step does: the nouns' columns only
            positions = self.capture.capture_tokens(positions)
        prediction = self.unet(inputs["latents"], inputs["timesteps"], inputs["text"]).sample
        loss = F.mse_loss(prediction.float(), inputs["latents"].float())
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


def reference_extra_bytes(unet: UNet2DConditionModel, batch: int, element: int) -> int:
    """What (c) adds: every attention map cloned and saved for backward (self-attention dominates)."""
    side = {name: int(group.split("_")[1]) for group, names in supervised_groups(
        unet, ["down", "mid", "up"], 64).items() for name in names}
    total = 0
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.endswith("attn1"):
            pixels = side[name[: -1] + "2"] ** 2
            total += 2 * batch * module.heads * pixels * pixels * element
    return total


def measure(variant_name: str, unet, groups, inputs, device, steps: int, warmup: int, baseline: int,
            autocast_dtype: torch.dtype | None) -> dict:
    variant = Variant(variant_name, unet, groups)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    times, cpu_times = [], []
    try:
        for index in range(warmup + steps):
            if index == warmup:
                _reset_peak(device)
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = variant.loss(inputs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            if index >= warmup:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
        peak = _peak(device, baseline)
    finally:
        variant.close()
        del optimizer
    # Process CPU time is reported too: on a shared CPU machine it is far less noisy than wall time.
    return {"step_s": statistics.median(times), "step_s_all": times, "cpu_s": statistics.median(cpu_times),
            "peak_bytes": peak}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    _release_cpu_memory()
    baseline = 0 if device.type == "cuda" else _rss_bytes("VmRSS")
    unet = build_unet(args.full, device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    groups = supervised_groups(unet, ["mid", "up"], 64)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    element = 2 if autocast_dtype is not None else 4
    results: dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "full_size": args.full,
        "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        "channels": unet.config.block_out_channels, "latent": 64, "mask_side": args.mask_side,
        "dtype": str(autocast_dtype or torch.float32),
        "gradient_checkpointing": args.gradient_checkpointing, "supervised_groups": {g: len(n) for g, n in groups.items()},
        "memory": "peak torch.cuda.max_memory_allocated" if device.type == "cuda"
        else "peak RSS (VmHWM) above the RSS before the model was built",
        "batches": {},
    }
    for batch in args.batches:
        inputs = make_batch(batch, device, args.mask_side)
        rows = {}
        for name in args.variants:
            if name == "reference" and device.type == "cpu":
                needed = reference_extra_bytes(unet, batch, element)
                available = _rss_bytes("VmRSS") + _meminfo_available()
                if needed > 0.6 * available:
                    rows[name] = {"skipped": f"needs ~{needed / 2**30:.1f} GiB more than (a); "
                                             f"{available / 2**30:.1f} GiB available"}
                    continue
            rows[name] = measure(name, unet, groups, inputs, device, args.steps, args.warmup, baseline,
                                 autocast_dtype)
            print(f"batch {batch} {name}: {rows[name]['step_s']:.3f} s/step ({rows[name]['cpu_s']:.3f} s CPU), "
                  f"{rows[name]['peak_bytes'] / 2**20:.0f} MiB", flush=True)
        plain = rows["plain"]
        for name in set(args.variants) - {"plain"}:
            if "step_s" in rows[name]:
                rows[name]["time_vs_plain"] = round(rows[name]["step_s"] / plain["step_s"], 3)
                rows[name]["cpu_time_vs_plain"] = round(rows[name]["cpu_s"] / plain["cpu_s"], 3)
                rows[name]["memory_vs_plain"] = round(rows[name]["peak_bytes"] / plain["peak_bytes"], 3)
        results["batches"][str(batch)] = rows
        del inputs
    return results


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="full-size SD 1.4 U-Net (meant for a GPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--mask-side", type=int, default=64, help="mask side in the batch (a multiple of 64)")
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
