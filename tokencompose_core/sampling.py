"""Stage 4: prompt sources and batched, seeded, resumable sampling.

Every image has its own seed, ``image_seed(base, prompt_id, image_index)``, and its
initial noise is drawn on the CPU from a generator seeded with it, so any image can
be regenerated alone (``sample`` with that single prompt) whatever batch it was
first made in. Images go to ``out_uri/images/shard-NNNNN/p{prompt_id}_i{index}.png``
(atomic writes); ``index.parquet`` lists them. A rerun skips images that exist; a
rerun with another model or other sampling settings into the same folder is refused
(``sample_meta.json`` holds the settings fingerprint).
"""

from __future__ import annotations

import inspect
import io
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image

from tokencompose_core import lora, storage
from tokencompose_core.conditioning import TextEmbeddings, encode_mmdit, encode_text, square_time_ids, unet_kwargs
from tokencompose_core.config import ModelsConfig, SampleConfig
from tokencompose_core.devices import placement, resolve_device
from tokencompose_core.identity import seed_from, uri_identity, value_hash
from tokencompose_core.prompts import VISOR, Prompt
from tokencompose_core.threads import pinned_threads
from tokencompose_core.visor import load_visor_prompts

MULTIGEN_SETS = {
    "coco": "coco_obj_comp_5_1k.json",
    "ade20k": "ade20k_obj_comp_5_1k.json",
}
_RESOURCES = Path(__file__).resolve().parent / "resources" / "multigen"
GENEVAL = "geneval:"  # prompt source prefix: geneval:<path to evaluation_metadata.jsonl>
INDEX_COLUMNS = ["prompt_id", "image_index", "seed", "prompt", "image_uri", "model_fingerprint"]
# transformers/diffusers build models under process-global init patches (meta device):
# two threads loading at once (shards on a thread-pool task runner) corrupt each other.
_LOAD_LOCK = threading.Lock()


# ----------------------------------------------------------------------------- prompts


def load_prompts(spec: str, max_prompts: int | None = None) -> list[Prompt]:
    """Prompts from ``multigen:coco``/``multigen:ade20k``, ``visor:sr2d``,
    ``geneval:<evaluation_metadata.jsonl>``, a .txt, a MultiGen .json, or a JSONL/Parquet
    prompt table (``prompt_id``, ``text``, ``categories``, ``groups`` columns) or
    manifest with a ``caption`` or ``text`` column."""
    if spec.startswith("multigen:"):
        name = spec.split(":", 1)[1]
        if name not in MULTIGEN_SETS:
            raise ValueError(f"unknown MultiGen set {name!r}; known: {', '.join(MULTIGEN_SETS)}")
        prompts = _multigen_prompts(json.loads((_RESOURCES / MULTIGEN_SETS[name]).read_text("utf-8")), spec)
    elif spec.startswith(GENEVAL):
        prompts = [Prompt(i, str(record["prompt"]), tuple(str(item["class"]) for item in record.get("include", [])))
                   for i, record in enumerate(geneval_metadata(spec[len(GENEVAL):]))]
    elif spec.startswith(VISOR):
        prompts = load_visor_prompts(spec)
    else:
        prompts = _file_prompts(spec)
    if not prompts:
        raise ValueError(f"no prompts found in {spec}")
    return prompts[:max_prompts] if max_prompts is not None else prompts


def prompt_file(spec: str) -> str | None:
    """The file a prompt source reads (None for the bundled MultiGen and VISOR sets)."""
    if spec.startswith(("multigen:", VISOR)):
        return None
    return spec[len(GENEVAL):] if spec.startswith(GENEVAL) else spec


def geneval_metadata(uri: str) -> list[dict[str, Any]]:
    """GenEval's ``evaluation_metadata.jsonl``: one object per line with ``tag``, ``include``
    ([{"class", "count", ...}]) and ``prompt``; the line number is the prompt id (GenEval's
    folder number)."""
    records = [json.loads(line) for line in _decode(storage.read_bytes(uri), uri).splitlines() if line.strip()]
    if not records or not all(isinstance(r, dict) and "prompt" in r and "include" in r for r in records):
        raise ValueError(f"{uri} is not GenEval evaluation metadata (JSON lines with 'prompt' and 'include')")
    return records


def prompt_set_name(spec: str) -> str:
    """A short name for a prompt source: ``coco`` for multigen:coco, ``sr2d`` for visor:sr2d,
    ``geneval``, else the file stem."""
    if spec.startswith(("multigen:", VISOR)):
        return spec.split(":", 1)[1]
    if spec.startswith(GENEVAL):
        return "geneval"
    return Path(spec.rstrip("/")).name.split(".")[0] or "prompts"


def _file_prompts(uri: str) -> list[Prompt]:
    if not storage.exists(uri):
        raise FileNotFoundError(f"prompt file not found: {uri}")
    suffix = Path(uri).suffix.lower()
    raw = storage.read_bytes(uri)
    if suffix == ".txt":
        lines = [line.strip() for line in _decode(raw, uri).splitlines()]
        return [Prompt(i, text) for i, text in enumerate(line for line in lines if line)]
    if suffix == ".json":
        try:
            records = json.loads(_decode(raw, uri))
        except json.JSONDecodeError as error:
            raise ValueError(f"{uri} is not valid JSON: {error}") from None
        return _multigen_prompts(records, uri)
    if suffix in (".jsonl", ".parquet"):
        return _manifest_prompts(raw, uri, suffix)
    raise ValueError(f"unsupported prompt file {uri}: expected .txt, .json (MultiGen), .jsonl or .parquet")


def _decode(raw: bytes, uri: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{uri} is not a UTF-8 text file") from None


def _multigen_prompts(records: Any, source: str) -> list[Prompt]:
    if not isinstance(records, list) or not all(isinstance(r, dict) and "text" in r for r in records):
        raise ValueError(f"{source} is not a MultiGen prompt file (a JSON list of objects with 'text')")
    prompts = []
    for position, record in enumerate(records):
        keys = sorted((k for k in record if k.startswith("obj_") and k.endswith("_attributes")),
                      key=lambda k: int(k.split("_")[1]))
        categories = tuple(" ".join(record[k]) for k in keys)
        prompts.append(Prompt(int(record.get("unique_id", position)), str(record["text"]), categories))
    return prompts


def _manifest_prompts(raw: bytes, uri: str, suffix: str) -> list[Prompt]:
    try:
        frame = pd.read_parquet(io.BytesIO(raw)) if suffix == ".parquet" else pd.read_json(
            io.BytesIO(raw), lines=True)
    except (ValueError, OSError) as error:
        raise ValueError(f"{uri} is not a readable {suffix} manifest: {error}") from None
    column = next((c for c in ("caption", "text", "captions", "prompt") if c in frame.columns), None)
    if column is None:
        raise ValueError(f"{uri} has no caption/text/captions/prompt column (columns: {list(frame.columns)})")
    # A manifest row may hold several captions; the first one is the prompt.
    texts = [v[0] if isinstance(v, (list, tuple, np.ndarray)) and len(v) else v for v in frame[column]]
    # A prompt table may name each prompt's id, objects and groups (the demo's test prompts).
    ids = frame["prompt_id"].astype(int).tolist() if "prompt_id" in frame.columns else range(len(frame))
    categories = _tuples(frame, "categories")
    groups = _tuples(frame, "groups")
    return [Prompt(i, str(t), c, groups=g) for i, t, c, g in zip(ids, texts, categories, groups)
            if isinstance(t, str) and t.strip()]


def _tuples(frame: pd.DataFrame, column: str) -> list[tuple[str, ...]]:
    if column not in frame.columns:
        return [()] * len(frame)
    return [tuple(str(v) for v in value) if isinstance(value, (list, tuple, np.ndarray)) else ()
            for value in frame[column]]


# ----------------------------------------------------------------------------- seeds & schedulers


def image_seed(base_seed: int, prompt_id: int, image_index: int) -> int:
    """A 63-bit seed that depends only on (base seed, prompt, image index)."""
    return seed_from(f"{base_seed}:{prompt_id}:{image_index}")


def _scheduler_classes() -> dict[str, Any]:
    import diffusers

    return {
        "ddim": diffusers.DDIMScheduler,
        "ddpm": diffusers.DDPMScheduler,
        "pndm": diffusers.PNDMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "euler_a": diffusers.EulerAncestralDiscreteScheduler,
        "lms": diffusers.LMSDiscreteScheduler,
        "dpm": diffusers.DPMSolverMultistepScheduler,
        "unipc": diffusers.UniPCMultistepScheduler,
    }


def build_scheduler(name: str, base_config: Any, stock: str | None = None) -> Any:
    """A fresh scheduler of kind ``name`` from the model's scheduler config; ``"model"``: of the
    class ``stock`` the model's own config names (its stock pipeline's scheduler,
    ``DiffusionParts.stock_scheduler``)."""
    classes = _scheduler_classes()
    if name == "model":
        found = [key for key, cls in classes.items() if cls.__name__ == stock]
        if not found:
            raise ValueError(f"sample.scheduler=model: the model's scheduler {stock!r} is not one of "
                             f"{', '.join(cls.__name__ for cls in classes.values())}; name one instead")
        name = found[0]
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(classes)}, or model")
    # StableDiffusionPipeline runs PNDM without the Runge-Kutta warm-up steps.
    extra = {"skip_prk_steps": True} if name == "pndm" else {}
    return classes[name].from_config(base_config, **extra)


def load_parts(model_dir: str, unet_dir: str | None, device: torch.device, dtype: torch.dtype,
               models: ModelsConfig | None = None) -> Any:
    """:func:`tokencompose_core.models.load_diffusion` (an MMDiT model: ``load_mmdit``), one thread
    at a time; a LoRA run's ``lora/`` as ``unet_dir`` is merged into the base U-Net or transformer.
    ``models``: the profile's replacement VAE and T5 text length (None: the model's own)."""
    from tokencompose_core.models import is_mmdit, load_diffusion, load_mmdit, resolve_vae_dir

    models = models or ModelsConfig()

    adapter = unet_dir if unet_dir and lora.is_lora_folder(unet_dir) else None
    weights = None if adapter else unet_dir
    with _LOAD_LOCK:
        if is_mmdit(model_dir):
            parts = load_mmdit(model_dir, transformer_dir=weights, device=device, dtype=dtype,
                               max_sequence_length=models.max_sequence_length)
            encoders = list(parts.text_encoders.values())
        else:
            parts = load_diffusion(model_dir, unet_dir=weights, device=device, dtype=dtype,
                                   vae_dir=resolve_vae_dir(models))
            encoders = [parts.text_encoder, parts.text_encoder_2]
        if adapter:
            lora.merge_lora(parts.denoiser, adapter)
    for module in (parts.denoiser, parts.vae, *encoders):
        if module is not None:
            module.eval()
    return parts


def resolve_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """fp16/bf16 on CUDA; always fp32 on the CPU (half precision there is slow and lossy)."""
    if device.type != "cuda" or mixed_precision == "no":
        return torch.float32
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


# ----------------------------------------------------------------------------- the sampler


@dataclass(frozen=True)
class SampleItem:
    prompt: Prompt
    image_index: int
    seed: int
    image_uri: str


def encode_prompts(parts: Any, texts: list[str]) -> TextEmbeddings:
    """Text embeddings of ``texts`` (SDXL: both encoders' and the pooled one), padded to 77 tokens;
    an MMDiT's: its pipeline's own prompt encoding."""
    if parts.is_mmdit:
        return encode_mmdit(parts, texts)
    return encode_text(parts.text_encoders, texts)


def unconditional(parts: Any) -> TextEmbeddings:
    """The guidance's unconditional embedding (batch of one): the empty prompt's, or zeros
    where the model's pipeline says so (SDXL's ``force_zeros_for_empty_prompt``)."""
    empty = encode_prompts(parts, [""])
    return empty.zeros_like() if parts.force_zeros_for_empty_prompt else empty


def initial_noise(seeds: list[int], shape: tuple[int, int, int], device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """Per-image noise drawn in fp32 on the CPU, so it is the same on every device and batch."""
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


@torch.no_grad()
def denoise(parts: Any, scheduler: Any, latents: torch.Tensor, cond: TextEmbeddings,
            uncond: TextEmbeddings | None, guidance_scale: float, steps: int,
            generators: list[torch.Generator]) -> torch.Tensor:
    """The sampling loop with classifier-free guidance (skipped when ``uncond`` is None).

    SDXL also gets its pooled embeddings and the uncropped target size as ``add_time_ids``,
    as ``StableDiffusionXLPipeline`` passes them by default."""
    scheduler.set_timesteps(steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    # Only stochastic schedulers (euler_a, ddpm, ...) take a generator: the per-image
    # generators keep their noise reproducible per image.
    extra = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    text = cond if uncond is None else TextEmbeddings.cat([uncond, cond])
    side = latents.shape[-1] * parts.vae_scale_factor
    conditioning = unet_kwargs(text, square_time_ids(side, len(text)) if text.pooled is not None else None)
    for t in scheduler.timesteps:
        model_in = latents if uncond is None else torch.cat([latents, latents])
        model_in = scheduler.scale_model_input(model_in, t)
        out = parts.unet(model_in, t, **conditioning).sample
        if uncond is not None:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        latents = scheduler.step(out, t, latents, **extra).prev_sample
    return latents


@torch.no_grad()
def decode_images(parts: Any, latents: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) uint8 from latents, or from pixels directly when the model has no VAE."""
    if parts.vae is not None:
        latents = parts.vae.decode(latents.to(parts.vae.dtype) / parts.latent_scaling).sample
    pixels = (latents.float() / 2 + 0.5).clamp(0, 1)
    return (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def wants_safety_checker(setting: bool | str, model_dir: str) -> bool:
    """``sample.safety_checker`` for this model: ``"model"`` is on exactly when the model's
    ``model_index.json`` names a safety checker (SD 1.x snapshots do, SD 2.x ones say null)."""
    if setting != "model":
        return bool(setting)
    index = Path(model_dir) / "model_index.json"
    entry = json.loads(index.read_text(encoding="utf-8")).get("safety_checker") if index.is_file() else None
    return bool(entry) and any(entry)


class SafetyChecker:
    """The Stable Diffusion safety checker of a model folder: flagged images become black, as in the stock pipeline."""

    def __init__(self, checker: torch.nn.Module, feature_extractor: Any) -> None:
        self.checker = checker.eval()
        self.feature_extractor = feature_extractor

    @classmethod
    def from_model_dir(cls, model_dir: str, device: torch.device, dtype: torch.dtype) -> "SafetyChecker":
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        from tokencompose_core.models import MissingWeightsError

        try:
            checker = StableDiffusionSafetyChecker.from_pretrained(model_dir, subfolder="safety_checker",
                                                                   local_files_only=True)
            extractor = CLIPImageProcessor.from_pretrained(model_dir, subfolder="feature_extractor",
                                                           local_files_only=True)
        except OSError as error:
            raise MissingWeightsError(
                f"sample.safety_checker is on but {model_dir} has no safety_checker/ and feature_extractor/ "
                f"({error}); use the full Stable Diffusion snapshot or set sample.safety_checker=false"
            ) from error
        return cls(checker.to(device=device, dtype=dtype), extractor)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, list[bool]]:
        """(B, H, W, 3) uint8 -> the same with flagged images zeroed, and the flags."""
        parameter = next(self.checker.parameters())
        clip_input = self.feature_extractor(list(images), return_tensors="pt").pixel_values
        checked, flagged = self.checker(clip_input=clip_input.to(parameter.device, parameter.dtype),
                                        images=images.copy())
        return np.asarray(checked, dtype=np.uint8), [bool(flag) for flag in flagged]


def is_whole_png(uri: str) -> bool:
    """The image is there and every chunk checks out (CRC) to the end marker, so a
    truncated or damaged PNG is redone, never handed to scoring. ``verify`` reads the
    chunks without decompressing them: cheap enough to run on every image of a resumed folder."""
    if not storage.exists(uri):
        return False
    try:
        Image.open(io.BytesIO(storage.read_bytes(uri))).verify()
    except (OSError, SyntaxError, ValueError):  # PIL's errors for cut or corrupt files
        return False
    return True


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def model_fingerprint(model_dir: str, unet_dir: str | None = None) -> str:
    """Identity of the weights: the model folder's and the trained U-Net's (or LoRA's), by content."""
    return value_hash([uri_identity(model_dir)] + ([uri_identity(unet_dir)] if unet_dir else []))


def shard_items(prompts: list[Prompt], images_per_prompt: int, base_seed: int, out_uri: str,
                shard: tuple[int, int]) -> list[SampleItem]:
    """This shard's (prompt, image index) pairs: every n-th pair of the full list."""
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {shard} is not (i, n) with 0 <= i < n")
    folder = storage.join(out_uri, "images", f"shard-{index:05d}")
    pairs = [(p, i) for p in prompts for i in range(images_per_prompt)]
    return [SampleItem(p, i, image_seed(base_seed, p.prompt_id, i), storage.join(folder, f"p{p.prompt_id}_i{i}.png"))
            for k, (p, i) in enumerate(pairs) if k % count == index]


def _batches(items: list[SampleItem], size: int) -> Iterator[list[SampleItem]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# Asking for more prompts or images extends a folder: the images already there stay valid.
_EXTENDS = ("max_prompts", "images_per_prompt")


def _check_settings(out_uri: str, meta: dict[str, Any]) -> None:
    """Refuse to resume into a folder made with another model or other settings; else
    record the current settings (a rerun may have asked for more prompts or images)."""
    meta_uri = storage.join(out_uri, "sample_meta.json")
    if storage.exists(meta_uri):
        old = storage.read_json(meta_uri)
        made = (old.get("model_fingerprint"), _without(old.get("settings", {})))
        wanted = (meta["model_fingerprint"], _without(meta["settings"]))
        if made != wanted:
            raise ValueError(f"{out_uri} holds samples made with other settings or another model; "
                             "use a new output folder")
    storage.atomic_write_json(meta_uri, meta)


def _without(settings: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in settings.items() if name not in _EXTENDS}


def shard_index_uri(out_uri: str, shard: tuple[int, int]) -> str:
    if shard[1] == 1:
        return storage.join(out_uri, "index.parquet")
    return storage.join(out_uri, "shards", f"index-{shard[0]:05d}-of-{shard[1]:05d}.parquet")


def shard_stats_uri(out_uri: str, shard: tuple[int, int]) -> str:
    if shard[1] == 1:
        return storage.join(out_uri, "stats.json")
    return storage.join(out_uri, "shards", f"stats-{shard[0]:05d}-of-{shard[1]:05d}.json")


def sample(settings: SampleConfig, models: ModelsConfig, model_dir: str, out_uri: str, prompts: list[Prompt],
           unet_dir: str | None = None, shard: tuple[int, int] = (0, 1)) -> str:
    """Generate ``images_per_prompt`` images per prompt; returns the index Parquet URI.

    With ``shard=(i, n)``, n > 1, this worker makes every n-th image and writes
    ``shards/index-i-of-n.parquet`` (and stats); :func:`merge_shards` joins them.
    """
    from tokencompose_core.stages import section_settings

    cfg = settings
    fp = model_fingerprint(model_dir, unet_dir)
    meta = {"settings": section_settings("sample", cfg), "model_fingerprint": fp,
            "model_dir": model_dir, "unet_dir": unet_dir, "sample": cfg.model_dump(mode="json")}
    _check_settings(out_uri, meta)
    items = shard_items(prompts, cfg.images_per_prompt, cfg.seed, out_uri, shard)
    todo = [item for item in items if not is_whole_png(item.image_uri)]
    seconds = 0.0
    # This process's own GPU: a worker sees only its own (tokencompose_core.devices).
    device = resolve_device(cfg.device)
    if todo:
        dtype = resolve_dtype(cfg.mixed_precision, device)
        with pinned_threads(cfg.torch_threads):
            parts = load_parts(model_dir, unet_dir, device, dtype, models)
            wanted = wants_safety_checker(cfg.safety_checker, model_dir)
            checker = SafetyChecker.from_model_dir(model_dir, device, dtype) if wanted else None
            seconds = generate_images(parts, cfg, todo, device, checker)
    index = pd.DataFrame([(it.prompt.prompt_id, it.image_index, it.seed, it.prompt.text, it.image_uri, fp)
                          for it in items], columns=INDEX_COLUMNS)
    index_uri = shard_index_uri(out_uri, shard)
    storage.atomic_write_parquet(index, index_uri)
    stats_uri = shard_stats_uri(out_uri, shard)
    # A rerun with nothing left to do keeps the throughput measured by the run that sampled.
    if todo or not storage.exists(stats_uri):
        stats = {"images": len(todo), "seconds": seconds, "images_per_s": len(todo) / seconds if seconds else None,
                 "skipped": len(items) - len(todo), "batch_size": cfg.batch_size, **placement(device)}
        storage.atomic_write_json(stats_uri, stats)
    return index_uri


def _padded_batches(items: list[SampleItem], size: int) -> Iterator[tuple[list[SampleItem], list[SampleItem]]]:
    """(batch, padded batch): a short batch is padded with repeats of its last item, so kernels
    always see the same shapes, which keeps each image bit-identical whichever batch it falls in."""
    from tqdm.auto import tqdm

    for batch in tqdm(list(_batches(items, size)), desc="sample", unit="batch"):
        yield batch, batch + [batch[-1]] * (size - len(batch))


def generate_images(parts: Any, cfg: SampleConfig, items: list[SampleItem], device: torch.device,
                    checker: SafetyChecker | None = None) -> float:
    """Sample ``items`` in batches, writing each PNG as soon as its batch is done."""
    if parts.is_mmdit:
        return generate_mmdit_images(parts, cfg, items, device)
    resolution = cfg.resolution or parts.sample_size
    side = resolution // parts.vae_scale_factor
    shape = (parts.latent_channels, side, side)
    dtype = next(parts.unet.parameters()).dtype
    use_cfg = cfg.guidance_scale > 1.0
    uncond_one = unconditional(parts) if use_cfg else None
    started = time.perf_counter()
    for batch, padded in _padded_batches(items, cfg.batch_size):
        seeds = [item.seed for item in padded]
        cond = encode_prompts(parts, [item.prompt.text for item in padded])
        uncond = uncond_one.expand(len(padded)) if use_cfg else None
        # Step generators are seeded apart from the initial noise (seed + 1) so they never repeat it.
        generators = [torch.Generator("cpu").manual_seed(s + 1) for s in seeds]
        latents = denoise(parts, build_scheduler(cfg.scheduler, parts.scheduler.config, parts.stock_scheduler),
                          initial_noise(seeds, shape, device, dtype), cond, uncond,
                          cfg.guidance_scale, cfg.num_inference_steps, generators)
        images = decode_images(parts, latents)
        if checker is not None:
            images, _ = checker(images)
        for item, image in zip(batch, images):
            storage.atomic_write_bytes(item.image_uri, png_bytes(image))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def generate_mmdit_images(parts: Any, cfg: SampleConfig, items: list[SampleItem], device: torch.device) -> float:
    """SD 3.5 / FLUX: each batch through the model's own pipeline (``StableDiffusion3Pipeline``,
    ``FluxPipeline``) with its flow-matching scheduler, from our per-image seeded noise, so an image
    is the stock pipeline's for a generator seeded with the image's seed."""
    if cfg.scheduler != "model":
        raise ValueError(f"sample.scheduler={cfg.scheduler!r}: SD 3.5 and FLUX sample with their own "
                         "flow-matching scheduler; set sample.scheduler=model")
    resolution = cfg.resolution or parts.sample_size
    side = resolution // parts.vae_scale_factor
    dtype = next(parts.transformer.parameters()).dtype
    pipeline = parts.pipeline()
    pipeline.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    for batch, padded in _padded_batches(items, cfg.batch_size):
        noise = initial_noise([item.seed for item in padded], (parts.latent_channels, side, side), device, dtype)
        if parts.family == "flux":
            noise = pipeline._pack_latents(noise, len(padded), parts.latent_channels, side, side)
        with torch.no_grad():
            images = pipeline(prompt=[item.prompt.text for item in padded], latents=noise, height=resolution,
                              width=resolution, num_inference_steps=cfg.num_inference_steps,
                              guidance_scale=cfg.guidance_scale, max_sequence_length=parts.max_sequence_length,
                              output_type="np").images
        for item, image in zip(batch, images):
            storage.atomic_write_bytes(item.image_uri, png_bytes((image * 255).round().astype(np.uint8)))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def merge_shards(out_uri: str, num_shards: int) -> str:
    """Join the shards' indexes and stats into ``index.parquet`` and ``stats.json``."""
    if num_shards == 1:
        return storage.join(out_uri, "index.parquet")
    shards = [(i, num_shards) for i in range(num_shards)]
    index = pd.concat([storage.read_parquet(shard_index_uri(out_uri, s)) for s in shards], ignore_index=True)
    index = index.sort_values(["prompt_id", "image_index"], ignore_index=True)
    stats = [storage.read_json(shard_stats_uri(out_uri, s)) for s in shards]
    images = sum(s["images"] for s in stats)
    # Shards run in parallel: throughput is total images over the slowest shard's time.
    seconds = max(s["seconds"] for s in stats)
    merged = {"images": images, "seconds": seconds, "images_per_s": images / seconds if seconds else None,
              "skipped": sum(s["skipped"] for s in stats), "batch_size": stats[0]["batch_size"],
              "shards": num_shards}
    index_uri = storage.join(out_uri, "index.parquet")
    storage.atomic_write_parquet(index, index_uri)
    storage.atomic_write_json(shard_stats_uri(out_uri, (0, 1)), merged)
    return index_uri
