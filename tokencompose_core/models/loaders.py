"""The public loaders: every model the pipeline uses, tiny or real, and the profile's identity.

A real profile reads everything offline and never falls back to random weights; a
missing file raises :class:`MissingWeightsError` naming the file and how to get it.
"""

from __future__ import annotations

import ast
import importlib.resources
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Owlv2ForObjectDetection,
    Owlv2Processor,
    OwlViTForObjectDetection,
    OwlViTProcessor,
    PreTrainedTokenizerBase,
)

from tokencompose_core.config import ModelsConfig
from tokencompose_core.gdino_compat import build_grounding_dino
from tokencompose_core.identity import folders_identity, uri_identity, value_hash
from tokencompose_core.models.architectures import TINY, arch_dir, read_config_json
from tokencompose_core.models.mmdit import is_mmdit, mmdit_family, model_index, required_files
from tokencompose_core.models.tiny import (
    build_tiny_sam,
    diffusion_parts,
    library_versions,
    materialise_tiny_diffusion,
    mmdit_arch_family,
    owlv2_from_arch,
    seeded_init,
)
from tokencompose_core.models.tokenizers import local_bert_tokenizer
from tokencompose_core.models.weights import (
    GDINO_RELEASES,
    GDINO_SWINT_OGC_URL,
    SAM_CHECKPOINT_URLS,
    SAM_HQ_CHECKPOINT_URLS,
    MissingWeightsError,
    hub_snapshot,
    load_exact,
    load_state_dict_file,
    require_weights,
    vae_dtype,
)

# Architecture folder used for OWLv2 when ``random_weights=True`` on a real profile.
OWLV2_RANDOM_ARCH = "owlv2-large-patch14"


@dataclass
class DiffusionParts:
    """The pieces of a Stable Diffusion-shaped model (SD 1.x/2.x or SDXL), loaded and ready to use."""

    unet: nn.Module
    vae: nn.Module | None  # None: the model denoises pixels directly
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: Any  # DDPMScheduler: the training noise schedule
    prediction_type: str
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell (1 in pixel space)
    latent_scaling: float  # multiply VAE latents by this before the U-Net
    sample_size: int  # image side in pixels
    # SDXL: the OpenCLIP bigG encoder (its projected pooled output is the U-Net's text_embeds).
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    # SDXL pipeline semantics: the unconditional branch of guidance gets zero embeddings.
    force_zeros_for_empty_prompt: bool = False
    # The scheduler class the model's own config names (its stock pipeline samples with it);
    # ``scheduler`` above is always DDPM, the training noise schedule.
    stock_scheduler: str | None = None

    # What every stage asks of a loaded model, whichever family (MMDiTParts answers too).
    is_mmdit = False

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @property
    def text_encoders(self) -> list[tuple[nn.Module, CLIPTokenizer]]:
        """(encoder, tokenizer) pairs in the order their hidden states are concatenated."""
        pairs = [(self.text_encoder, self.tokenizer)]
        if self.text_encoder_2 is not None:
            pairs.append((self.text_encoder_2, self.tokenizer_2))
        return pairs


# --------------------------------------------------------------------------- diffusion


def resolve_diffusion_dir(models: ModelsConfig) -> str:
    """Local diffusers directory of the profile's diffusion model (Stable Diffusion, SD 3 or FLUX).

    ``tiny``: built from ``configs/models/<models.diffusion>/`` with ``models.seed``
    into ``<cache_dir>/<name>-<hash>`` (once; later calls reuse it).
    ``pretrained``: a local diffusers directory or a hub id already in the cache, with the
    files its layout needs (SD 3 / FLUX: every component its model_index.json lists).
    """
    if models.kind == TINY:
        return materialise_tiny_diffusion(models)
    model_dir = _diffusion_folder(models)
    if is_mmdit(model_dir):
        files = required_files(model_dir)
    else:
        files = ["unet/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"]
        if _has_second_encoder(Path(model_dir)):
            files += ["text_encoder_2/config.json", "tokenizer_2/vocab.json"]
    for required in files:
        if not os.path.isfile(os.path.join(model_dir, required)):
            raise MissingWeightsError(
                f"diffusion model {models.diffusion!r} has no {required} (looked in {model_dir}); "
                f"download the full diffusers layout, e.g. `huggingface-cli download {models.diffusion}`"
            )
    return os.path.abspath(model_dir)


def _diffusion_folder(models: ModelsConfig) -> str:
    """A real profile's local diffusers folder or cached hub snapshot, as it is."""
    if os.path.isdir(models.diffusion):
        return models.diffusion
    # The diffusers layout of SD 1.x/2.x/XL (unet/) and of SD 3/FLUX (transformer/, up to three encoders).
    return hub_snapshot(
        models.diffusion,
        "diffusion model",
        " --include 'unet/*' 'transformer/*' 'vae/*' 'text_encoder*/*' 'tokenizer*/*' 'scheduler/*' "
        "model_index.json",
    )


def diffusion_family(models: ModelsConfig) -> str | None:
    """"sd3" or "flux" for an MMDiT profile, None for a U-Net one (SD 1.x/2.x/XL).

    Tiny profiles say it with their architecture folder; a real one with its folder's or hub
    snapshot's model_index.json, so a snapshot not on this machine raises :class:`MissingWeightsError`."""
    if models.kind == TINY:
        return mmdit_arch_family(arch_dir(models.diffusion))
    return mmdit_family(_diffusion_folder(models))


def _has_second_encoder(root: Path) -> bool:
    """SDXL-shaped: its ``model_index.json`` names a ``text_encoder_2`` (or the folder is there)."""
    return bool(model_index(root).get("text_encoder_2")) or (root / "text_encoder_2" / "config.json").is_file()


def _force_zeros_for_empty_prompt(root: Path) -> bool:
    # StableDiffusionXLPipeline's default is True when the index does not say.
    return bool(model_index(root).get("force_zeros_for_empty_prompt", True))


def resolve_vae_dir(models: ModelsConfig) -> str | None:
    """The local folder of ``models.vae`` (a replacement VAE such as an fp16-safe one), or None."""
    if models.vae is None:
        return None
    folder = models.vae if os.path.isdir(models.vae) else hub_snapshot(models.vae, "VAE", "")
    return str(require_weights(Path(folder)).resolve())


def load_diffusion(
    model_dir: str,
    unet_dir: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dir: str | None = None,
) -> DiffusionParts:
    """Load a diffusers SD/SDXL directory; ``unet_dir`` (a trained U-Net) replaces ``unet/``,
    ``vae_dir`` (:func:`resolve_vae_dir`) replaces ``vae/``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    root = Path(model_dir)
    unet_path = Path(unet_dir) if unet_dir else root / "unet"
    if not (unet_path / "config.json").is_file():
        raise MissingWeightsError(f"no U-Net at {unet_path} (expected config.json and weights)")
    unet = UNet2DConditionModel.from_pretrained(unet_path, torch_dtype=dtype, local_files_only=True)
    vae = None
    vae_path = Path(vae_dir) if vae_dir else root / "vae"
    if (vae_path / "config.json").is_file():
        vae_config = AutoencoderKL.load_config(require_weights(vae_path))
        vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=vae_dtype(vae_config, dtype), local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(
        require_weights(root / "text_encoder"), dtype=dtype, local_files_only=True
    )
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    text_encoder_2 = tokenizer_2 = None
    if _has_second_encoder(root):
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            require_weights(root / "text_encoder_2"), dtype=dtype, local_files_only=True
        )
        tokenizer_2 = CLIPTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(root / "scheduler", local_files_only=True)
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is not None:
            module.to(device)
    return DiffusionParts(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        prediction_type=scheduler.config.prediction_type,
        latent_channels=unet.config.in_channels,
        vae_scale_factor=scale,
        latent_scaling=float(getattr(vae.config, "scaling_factor", 1.0)) if vae is not None else 1.0,
        sample_size=unet.config.sample_size * scale,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        force_zeros_for_empty_prompt=text_encoder_2 is not None and _force_zeros_for_empty_prompt(root),
        stock_scheduler=DDPMScheduler.load_config(root / "scheduler", local_files_only=True).get("_class_name"),
    )


# --------------------------------------------------------------------------- GroundingDINO


def _parse_gdino_py_config(path: Path) -> dict[str, Any]:
    """Read a groundingdino ``.py`` config as data: only ``name = literal`` lines, never executed."""
    values: dict[str, Any] = {}
    for node in ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body:
        simple = isinstance(node, ast.Assign) and len(node.targets) == 1
        if not (simple and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"{path}: line {node.lineno} is not a simple `name = value` assignment")
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def _gdino_args(config: str) -> types.SimpleNamespace:
    if config == TINY:
        values = read_config_json(arch_dir(TINY) / "grounding_dino" / "config.json")
    else:
        if config == "swint_ogc":
            package_configs = importlib.resources.files("groundingdino") / "config"
            path = Path(str(package_configs / "GroundingDINO_SwinT_OGC.py"))
        else:
            path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"GroundingDINO config not found: {path}")
        values = _parse_gdino_py_config(path)
        # Checkpointing only saves memory in training; weights are the same without it.
        values.update(use_checkpoint=False, use_transformer_ckpt=False)
    return types.SimpleNamespace(**values)


def _gdino_backbone(args: types.SimpleNamespace) -> nn.Module:
    from groundingdino.models.GroundingDINO.backbone.backbone import Joiner, build_backbone
    from groundingdino.models.GroundingDINO.backbone.position_encoding import build_position_encoding
    from groundingdino.models.GroundingDINO.backbone.swin_transformer import SwinTransformer

    if args.backbone != "swin_custom":
        return build_backbone(args)
    # A Swin smaller than groundingdino's named ones, same module layout.
    indices = list(args.return_interm_indices)
    swin = SwinTransformer(out_indices=tuple(indices), dilation=False, use_checkpoint=False, **args.swin)
    joiner = Joiner(swin, build_position_encoding(args))
    joiner.num_channels = swin.num_features[4 - len(indices) :]
    return joiner


def _gdino_text_encoder(
    args: types.SimpleNamespace, random_weights: bool
) -> tuple[PreTrainedTokenizerBase, BertConfig]:
    if args.backbone == "swin_custom":
        tokenizer = local_bert_tokenizer()
        return tokenizer, BertConfig(vocab_size=len(tokenizer), **args.bert)
    if random_weights:
        # bert-base shape; the local vocabulary fits inside its 30522 embeddings.
        return local_bert_tokenizer(), BertConfig()
    from transformers import AutoTokenizer

    name = args.text_encoder_type
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        config = BertConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        raise MissingWeightsError(
            f"GroundingDINO needs the {name!r} tokenizer and config.json in the Hugging Face cache "
            f"(read offline). Get them with `huggingface-cli download {name} config.json vocab.txt "
            "tokenizer.json tokenizer_config.json`."
        ) from None
    return tokenizer, config


def load_grounding_dino(
    models: ModelsConfig, device: str | torch.device = "cpu", random_weights: bool = False
) -> nn.Module:
    """GroundingDINO (groundingdino-py) in eval mode: tiny, real checkpoint, or full-size random."""
    spec = models.grounding_dino
    real = spec.config != TINY and not random_weights
    checkpoint = None
    if real:
        # Fail on a missing checkpoint before spending time building the model.
        if not spec.checkpoint or not Path(spec.checkpoint).is_file():
            raise MissingWeightsError(
                f"GroundingDINO checkpoint "
                f"{spec.checkpoint or 'models.grounding_dino.checkpoint (unset)'} "
                f"not found. Download groundingdino_swint_ogc.pth from {GDINO_SWINT_OGC_URL} "
                f"(releases: {GDINO_RELEASES}) and set models.grounding_dino.checkpoint to its path."
            )
        checkpoint = load_state_dict_file(spec.checkpoint)
    args = _gdino_args(spec.config)
    tokenizer, bert_config = _gdino_text_encoder(args, random_weights)
    with seeded_init(models.seed, "grounding_dino"):
        bert = BertModel(bert_config)
        model = build_grounding_dino(args, _gdino_backbone(args), tokenizer, bert)
    if checkpoint is not None:
        state = checkpoint.get("model", checkpoint)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        load_exact(model, state, spec.checkpoint)
    return model.to(device).eval()


# --------------------------------------------------------------------------- SAM


def sam_package(variant: str) -> types.ModuleType:
    """The package that builds and runs a SAM ``variant``: segment_anything or segment_anything_hq."""
    if variant == "sam":
        import segment_anything

        return segment_anything
    if variant == "sam_hq":
        import warnings

        with warnings.catch_warnings():  # its TinyViT registers with timm's deprecated API on import
            warnings.simplefilter("ignore")
            import segment_anything_hq
        return segment_anything_hq
    raise ValueError(f"unknown SAM variant {variant!r}; use sam or sam_hq")


def load_sam(
    models: ModelsConfig, device: str | torch.device = "cpu", random_weights: bool = False
) -> nn.Module:
    """SAM or SAM-HQ (``models.sam.variant``) in eval mode: tiny, vit_h/l/b checkpoint, or full-size random."""
    spec = models.sam
    package = sam_package(spec.variant)
    if spec.model_type == TINY:
        with seeded_init(models.seed, "sam"):
            model = build_tiny_sam(read_config_json(arch_dir(TINY) / "sam" / "config.json"), spec.variant, package)
        return model.to(device).eval()
    urls = SAM_HQ_CHECKPOINT_URLS if spec.variant == "sam_hq" else SAM_CHECKPOINT_URLS
    if spec.model_type not in urls:
        known = ", ".join([TINY, *urls])
        raise ValueError(f"unknown SAM model_type {spec.model_type!r}; use one of {known}")
    checkpoint = None
    if not random_weights:
        if not spec.checkpoint or not Path(spec.checkpoint).is_file():
            raise MissingWeightsError(
                f"{'SAM-HQ' if spec.variant == 'sam_hq' else 'SAM'} checkpoint "
                f"{spec.checkpoint or 'models.sam.checkpoint (unset)'} not found. "
                f"Download {urls[spec.model_type]} and set models.sam.checkpoint to its path."
            )
        checkpoint = load_state_dict_file(spec.checkpoint)
    with seeded_init(models.seed, "sam"):
        # checkpoint=None: the packages' own loaders use an unrestricted torch.load.
        model = package.sam_model_registry[spec.model_type](checkpoint=None)
    if checkpoint is not None:
        load_exact(model, checkpoint, spec.checkpoint)
    return model.to(device).eval()


# --------------------------------------------------------------------------- OWLv2


def load_owlv2(
    models: ModelsConfig, device: str | torch.device = "cpu", random_weights: bool = False,
    backend: str = "torchvision",
) -> tuple[Owlv2ForObjectDetection, Owlv2Processor]:
    """OWLv2 detector and its processor: tiny, hub id/local dir, or large-patch14-shaped random.

    ``backend``: the image processor's, "torchvision" (transformers 5's default, the former
    fast processor) or "pil" (the former slow one, ``score.owlv2_backend``)."""
    if models.owlv2 == TINY:
        model, processor = owlv2_from_arch(TINY, models.seed, backend)
    elif random_weights:
        model, processor = owlv2_from_arch(OWLV2_RANDOM_ARCH, models.seed, backend)
    else:
        source = models.owlv2
        if not os.path.isdir(source):
            source = hub_snapshot(source, "OWLv2 model", "")
        model = Owlv2ForObjectDetection.from_pretrained(source, local_files_only=True)
        processor = Owlv2Processor.from_pretrained(source, local_files_only=True, backend=backend)
    return model.to(device).eval(), processor


def load_owlvit(models: ModelsConfig, device: str | torch.device = "cpu"
                ) -> tuple[OwlViTForObjectDetection, OwlViTProcessor]:
    """OWL-ViT detector and its processor from ``models.owlvit`` (hub id or local dir)."""
    if models.owlvit is None:
        raise MissingWeightsError("score.detector=owlvit needs OWL-ViT weights: set models.owlvit to a local copy "
                                  "or cached hub id of google/owlvit-base-patch32 (VISOR's detector)")
    source = models.owlvit if os.path.isdir(models.owlvit) else hub_snapshot(models.owlvit, "OWL-ViT model", "")
    model = OwlViTForObjectDetection.from_pretrained(source, local_files_only=True)
    processor = OwlViTProcessor.from_pretrained(source, local_files_only=True)
    return model.to(device).eval(), processor


# --------------------------------------------------------------------------- fingerprint


def file_identity(path: str | None) -> str:
    """Identity of a weight file by its content (its digest is memoised per file version)."""
    if not path:
        return "unset"
    return uri_identity(path) if os.path.exists(path) else f"missing:{path}"


def source_identity(source: str) -> str:
    """Identity of a local model folder by its content, or of a cached hub repo by its revision."""
    if os.path.isdir(source):
        return uri_identity(source)
    from huggingface_hub import snapshot_download

    try:
        return f"hub:{source}@{Path(snapshot_download(source, local_files_only=True)).name}"
    except Exception:  # not downloaded yet: the loader will say so; the identity changes once it is
        return f"hub:{source}@absent"


def fingerprint(models: ModelsConfig) -> str:
    """Short stable hash of the model profile: config plus weight identity.

    Tiny models: config, seed, architecture files and library versions. Real models:
    config plus the content of checkpoints and local model folders, or the cached hub
    revision. ``cache_dir`` is excluded: where a model is cached does not
    change it.
    """
    # An unset max_sequence_length is left out, so profiles without T5 keep their identity.
    unset = {"max_sequence_length"} if models.max_sequence_length is None else set()
    parts: dict[str, Any] = {"config": models.model_dump(mode="json", exclude={"cache_dir"} | unset)}
    tiny_dirs: list[Path] = []
    if models.kind == TINY:
        tiny_dirs += diffusion_parts(arch_dir(models.diffusion))
    else:
        parts["diffusion"] = source_identity(models.diffusion)
    if models.grounding_dino.config == TINY or models.sam.model_type == TINY or models.owlv2 == TINY:
        tiny_dirs += [arch_dir(TINY) / part for part in ("grounding_dino", "sam", "owlv2")]
    if models.grounding_dino.config != TINY:
        parts["grounding_dino"] = [file_identity(models.grounding_dino.checkpoint)]
        if Path(models.grounding_dino.config).is_file():
            parts["grounding_dino"].append(file_identity(models.grounding_dino.config))
    if models.sam.model_type != TINY:
        parts["sam"] = file_identity(models.sam.checkpoint)
    if models.owlv2 != TINY:
        parts["owlv2"] = source_identity(models.owlv2)
    if models.vae is not None:
        parts["vae"] = source_identity(models.vae)
    if models.owlvit is not None:
        parts["owlvit"] = source_identity(models.owlvit)
    if models.clip_selector:
        parts["clip_selector"] = source_identity(models.clip_selector)
    if tiny_dirs:
        parts["tiny"] = f"{folders_identity(tiny_dirs)};{library_versions()}"
    return value_hash(parts)
