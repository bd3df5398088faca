"""Model profiles: one place that builds or loads every model the pipeline uses.

Two kinds of profile (``ModelsConfig.kind``):

* ``tiny``: random-initialised, seeded models built from architecture configs in
  ``configs/models/`` — no network, no weights. Used by tests and the demo.
* ``pretrained``: real weights — a Stable Diffusion hub id or local diffusers
  directory, GroundingDINO and SAM checkpoint files, an OWLv2 hub id or directory.
  Everything is read offline; a missing file raises :class:`MissingWeightsError`
  naming the file and how to get it. A real profile never falls back to random
  weights.

Benchmarks pass ``random_weights=True`` (or ``diffusion: sd14-random``) to get the
full-size architectures with random weights, still offline.

Checkpoints are read with safetensors or ``torch.load(weights_only=True)``, never
with plain pickle.
"""

from __future__ import annotations

import ast
import gzip
import importlib.resources
import json
import os
import shutil
import threading
import types
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2Processor,
    PreTrainedTokenizerBase,
)

from tokencompose_core.config import ModelsConfig, configs_dir
from tokencompose_core.identity import bytes_hash, component_seed, tree_hash, value_hash
from tokencompose_core.gdino_compat import build_grounding_dino

GDINO_RELEASES = "https://github.com/IDEA-Research/GroundingDINO/releases"
GDINO_SWINT_OGC_URL = f"{GDINO_RELEASES}/download/v0.1.0-alpha/groundingdino_swint_ogc.pth"
SAM_CHECKPOINT_URLS = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}
TINY = "tiny"
# Architecture folder used for OWLv2 when ``random_weights=True`` on a real profile.
OWLV2_RANDOM_ARCH = "owlv2-large-patch14"
CLIP_MAX_LENGTH = 77
OWLV2_MAX_LENGTH = 16
# Buffers that older checkpoints store but transformers 5 no longer persists.
_BENIGN_UNEXPECTED_SUFFIXES = ("position_ids", "token_type_ids")


class MissingWeightsError(FileNotFoundError):
    """A real profile needs a weight file or hub snapshot that is not on this machine."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds more than tensors (a pickle that could run code) and was refused."""


@dataclass
class DiffusionParts:
    """The pieces of a Stable Diffusion-shaped model, loaded and ready to use."""

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


# --------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable character table (in CLIP's vocab order)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The SD/CLIP vocabulary and merges, rebuilt from open_clip's BPE file (as CLIP does)."""
    bpe_file = importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe_file.read_bytes()).decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP keeps the first 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = _bytes_to_unicode()
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def _build_clip_tokenizer(**kwargs: Any) -> CLIPTokenizer:
    vocab, merges = _clip_bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), **kwargs)


@lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """The Stable Diffusion CLIP tokenizer, built offline (ids as SD's, max length 77)."""
    return _build_clip_tokenizer(model_max_length=CLIP_MAX_LENGTH)


def _owlv2_tokenizer() -> CLIPTokenizer:
    # OWLv2 pads with "!" (id 0) to 16 tokens; otherwise the same BPE as SD.
    return _build_clip_tokenizer(model_max_length=OWLV2_MAX_LENGTH, pad_token="!")


def _local_bert_tokenizer() -> BertTokenizer:
    """Uncased WordPiece tokenizer from the vocabulary kept in the repo (no download).

    ``vocab.txt`` holds BERT's special tokens, ASCII punctuation, digits and letters
    (with ``##`` continuations) and the words of the MultiGen prompts and of COCO
    captions, so any lowercase ASCII caption tokenizes; rarer words split into letters.
    """
    lines = (_arch_dir(TINY) / "grounding_dino" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return BertTokenizer(vocab={token: index for index, token in enumerate(lines)}, do_lower_case=True)


# --------------------------------------------------------------------------- helpers


def _arch_dir(name: str) -> Path:
    path = configs_dir() / "models" / name
    if not path.is_dir():
        known = sorted(p.name for p in (configs_dir() / "models").iterdir() if p.is_dir())
        raise FileNotFoundError(f"no architecture folder {path}; known: {', '.join(known)}")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


# torch's global RNG is shared by all threads: two tiny models built at once (two
# mask shards on a thread pool) would interleave their draws and get different
# weights. One lock makes every seeded build see only its own draws.
_SEEDED_BUILD = threading.RLock()


@contextmanager
def _seeded(seed: int, component: str) -> Iterator[None]:
    """Seed initialisation per component, leaving the caller's RNG state untouched."""
    with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed(seed, component))
        yield


def _library_versions() -> str:
    import diffusers
    import transformers

    # Random init depends on library code, so it is part of a tiny model's identity.
    versions = (("torch", torch), ("diffusers", diffusers), ("transformers", transformers))
    return ";".join(f"{name}={module.__version__}" for name, module in versions)


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth`` checkpoint; pickled code is refused."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError or RuntimeError variants
        raise UnsafeCheckpointError(
            f"refusing to load {path}: not a plain tensor checkpoint "
            f"(weights-only unpickling failed: {type(error).__name__}: {str(error).splitlines()[0]})"
        ) from None


def _load_exact(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights; any missing parameter is an error (never a partly random model)."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    unexpected = [k for k in unexpected if not k.endswith(_BENIGN_UNEXPECTED_SUFFIXES)]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model architecture: "
            f"{len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )


def _hub_snapshot(repo_id: str, what: str, how: str) -> str:
    """Local snapshot folder of a hub repo, from the cache only."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception as error:  # not cached, or not a valid repo id (e.g. a missing local dir)
        raise MissingWeightsError(
            f"{what} {repo_id!r} is neither a local directory nor in the Hugging Face cache "
            f"(models are read offline). Get it with `huggingface-cli download {repo_id}{how}`, "
            f"or point the profile at a local copy. ({type(error).__name__})"
        ) from None


# --------------------------------------------------------------------------- diffusion


def resolve_diffusion_dir(models: ModelsConfig) -> str:
    """Local diffusers directory of the profile's diffusion model.

    ``tiny``: built from ``configs/models/<models.diffusion>/`` with ``models.seed``
    into ``<cache_dir>/<name>-<hash>`` (once; later calls reuse it).
    ``pretrained``: a local diffusers directory or a hub id already in the cache.
    """
    if models.kind == TINY:
        return _materialise_tiny_diffusion(models)
    if os.path.isdir(models.diffusion):
        model_dir = models.diffusion
    else:
        model_dir = _hub_snapshot(
            models.diffusion,
            "Stable Diffusion model",
            " --include 'unet/*' 'vae/*' 'text_encoder/*' 'tokenizer/*' 'scheduler/*' model_index.json",
        )
    for required in ("unet/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"):
        if not os.path.isfile(os.path.join(model_dir, required)):
            raise MissingWeightsError(
                f"diffusion model {models.diffusion!r} has no {required} (looked in {model_dir}); "
                f"download the full diffusers layout, e.g. `huggingface-cli download {models.diffusion}`"
            )
    return os.path.abspath(model_dir)


def _materialise_tiny_diffusion(models: ModelsConfig) -> str:
    arch = _arch_dir(models.diffusion)
    identity = f"{tree_hash(_diffusion_parts(arch))};seed={models.seed};{_library_versions()}"
    cache = Path(models.cache_dir).resolve()
    target = cache / f"{models.diffusion}-{bytes_hash(identity.encode())}"
    if (target / "model_index.json").is_file():
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    temp = cache / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        _write_tiny_diffusion(arch, models.seed, temp)
        try:
            os.rename(temp, target)  # atomic publish of the whole folder
        except OSError:
            if not (target / "model_index.json").is_file():
                raise  # not a lost race with another builder: a real error
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return str(target)


def _diffusion_parts(arch: Path) -> list[Path]:
    """The sub-folders of an architecture folder that make up the diffusion model."""
    parts = ("unet", "vae", "text_encoder", "scheduler")
    return [arch / part for part in parts if (arch / part).is_dir()]


def _write_tiny_diffusion(arch: Path, seed: int, out: Path) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    index: dict[str, Any] = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False}
    components = [
        ("unet", "diffusers", "UNet2DConditionModel", UNet2DConditionModel.from_config),
        ("vae", "diffusers", "AutoencoderKL", AutoencoderKL.from_config),
        ("text_encoder", "transformers", "CLIPTextModel", lambda c: CLIPTextModel(CLIPTextConfig.from_dict(c))),
    ]
    for name, library, class_name, build in components:
        config_file = arch / name / "config.json"
        if name == "vae" and not config_file.is_file():
            continue  # no VAE: a pixel-space model
        with _seeded(seed, name):
            module = build(_read_json(config_file))
        module.save_pretrained(out / name)
        index[name] = [library, class_name]
    clip_tokenizer().save_pretrained(out / "tokenizer")
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    scheduler = DDPMScheduler.from_config(_read_json(arch / "scheduler" / "scheduler_config.json"))
    scheduler.save_pretrained(out / "scheduler")
    index["scheduler"] = ["diffusers", "DDPMScheduler"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def load_diffusion(
    model_dir: str,
    unet_dir: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DiffusionParts:
    """Load a diffusers SD directory; ``unet_dir`` (a trained U-Net) replaces ``unet/``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    root = Path(model_dir)
    unet_path = Path(unet_dir) if unet_dir else root / "unet"
    if not (unet_path / "config.json").is_file():
        raise MissingWeightsError(f"no U-Net at {unet_path} (expected config.json and weights)")
    unet = UNet2DConditionModel.from_pretrained(unet_path, torch_dtype=dtype, local_files_only=True)
    vae = None
    if (root / "vae" / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype, local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(
        root / "text_encoder", dtype=dtype, local_files_only=True
    )
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(root / "scheduler", local_files_only=True)
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    for module in (unet, vae, text_encoder):
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
        values = _read_json(_arch_dir(TINY) / "grounding_dino" / "config.json")
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
        tokenizer = _local_bert_tokenizer()
        return tokenizer, BertConfig(vocab_size=len(tokenizer), **args.bert)
    if random_weights:
        # bert-base shape; the local vocabulary fits inside its 30522 embeddings.
        return _local_bert_tokenizer(), BertConfig()
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
    with _seeded(models.seed, "grounding_dino"):
        bert = BertModel(bert_config)
        model = build_grounding_dino(args, _gdino_backbone(args), tokenizer, bert)
    if checkpoint is not None:
        state = checkpoint.get("model", checkpoint)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        _load_exact(model, state, spec.checkpoint)
    return model.to(device).eval()


# --------------------------------------------------------------------------- SAM


SAM_HQ_CHECKPOINT_URLS = {
    "vit_h": "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_h.pth",
    "vit_l": "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_l.pth",
    "vit_b": "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_b.pth",
}


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


def _build_tiny_sam(spec: dict[str, Any], variant: str) -> nn.Module:
    modeling = importlib.import_module(f"{sam_package(variant).__name__}.modeling")
    size, patch, dim = spec["img_size"], spec["patch_size"], spec["prompt_embed_dim"]
    decoder = dict(
        num_multimask_outputs=3,
        transformer=modeling.TwoWayTransformer(
            depth=2,
            embedding_dim=dim,
            mlp_dim=spec["decoder_mlp_dim"],
            num_heads=spec["decoder_num_heads"],
        ),
        transformer_dim=dim,
        iou_head_depth=3,
        iou_head_hidden_dim=spec["iou_head_hidden_dim"],
    )
    # SAM-HQ's decoder also reads the encoder's first global-attention features.
    mask_decoder = (
        modeling.MaskDecoderHQ(**decoder, vit_dim=spec["encoder_embed_dim"])
        if variant == "sam_hq"
        else modeling.MaskDecoder(**decoder)
    )
    # Same composition as the packages' own _build_sam, at a small width.
    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            img_size=size,
            patch_size=patch,
            embed_dim=spec["encoder_embed_dim"],
            depth=spec["encoder_depth"],
            num_heads=spec["encoder_num_heads"],
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(spec["encoder_global_attn_indexes"]),
            window_size=spec["window_size"],
            out_chans=dim,
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(size // patch, size // patch),
            input_image_size=(size, size),
            mask_in_chans=16,
        ),
        mask_decoder=mask_decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def load_sam(
    models: ModelsConfig, device: str | torch.device = "cpu", random_weights: bool = False
) -> nn.Module:
    """SAM or SAM-HQ (``models.sam.variant``) in eval mode: tiny, vit_h/l/b checkpoint, or full-size random."""
    spec = models.sam
    package = sam_package(spec.variant)
    if spec.model_type == TINY:
        with _seeded(models.seed, "sam"):
            model = _build_tiny_sam(_read_json(_arch_dir(TINY) / "sam" / "config.json"), spec.variant)
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
    with _seeded(models.seed, "sam"):
        # checkpoint=None: the packages' own loaders use an unrestricted torch.load.
        model = package.sam_model_registry[spec.model_type](checkpoint=None)
    if checkpoint is not None:
        _load_exact(model, checkpoint, spec.checkpoint)
    return model.to(device).eval()


# --------------------------------------------------------------------------- OWLv2


def _owlv2_from_arch(name: str, seed: int) -> tuple[Owlv2ForObjectDetection, Owlv2Processor]:
    folder = _arch_dir(name) / "owlv2" if name == TINY else _arch_dir(name)
    config = Owlv2Config.from_dict(_read_json(folder / "config.json"))
    with _seeded(seed, "owlv2"):
        model = Owlv2ForObjectDetection(config)
    side = config.vision_config.image_size
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": side, "width": side}),
        tokenizer=_owlv2_tokenizer(),
    )
    return model, processor


def load_owlv2(
    models: ModelsConfig, device: str | torch.device = "cpu", random_weights: bool = False
) -> tuple[Owlv2ForObjectDetection, Owlv2Processor]:
    """OWLv2 detector and its processor: tiny, hub id/local dir, or large-patch14-shaped random."""
    if models.owlv2 == TINY:
        model, processor = _owlv2_from_arch(TINY, models.seed)
    elif random_weights:
        model, processor = _owlv2_from_arch(OWLV2_RANDOM_ARCH, models.seed)
    else:
        source = models.owlv2
        if not os.path.isdir(source):
            source = _hub_snapshot(source, "OWLv2 model", "")
        model = Owlv2ForObjectDetection.from_pretrained(source, local_files_only=True)
        processor = Owlv2Processor.from_pretrained(source, local_files_only=True)
    return model.to(device).eval(), processor


# --------------------------------------------------------------------------- fingerprint


def _file_identity(path: str | None) -> str:
    """Size and modification time of a weight file (cheap; changes when the file does)."""
    if not path:
        return "unset"
    try:
        stat = os.stat(path)
    except OSError:
        return f"missing:{path}"
    return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


def _source_identity(source: str) -> str:
    """Identity of a local model directory (file sizes/mtimes) or a cached hub repo (revision)."""
    if os.path.isdir(source):
        files = sorted(p for p in Path(source).rglob("*") if p.is_file())
        return ";".join(_file_identity(str(p)) for p in files)
    from huggingface_hub import snapshot_download

    try:
        return f"hub:{source}@{Path(snapshot_download(source, local_files_only=True)).name}"
    except Exception:  # not downloaded yet: the loader will say so; the identity changes once it is
        return f"hub:{source}@absent"


def fingerprint(models: ModelsConfig) -> str:
    """Short stable hash of the model profile: config plus weight identity.

    Tiny models: config, seed, architecture files and library versions. Real models:
    config plus checkpoint size/mtime, local directory contents' size/mtime, or the
    cached hub revision. ``cache_dir`` is excluded: where a model is cached does not
    change it.
    """
    parts: dict[str, Any] = {"config": models.model_dump(mode="json", exclude={"cache_dir"})}
    tiny_dirs: list[Path] = []
    if models.kind == TINY:
        tiny_dirs += _diffusion_parts(_arch_dir(models.diffusion))
    else:
        parts["diffusion"] = _source_identity(models.diffusion)
    if models.grounding_dino.config == TINY or models.sam.model_type == TINY or models.owlv2 == TINY:
        tiny_dirs += [_arch_dir(TINY) / part for part in ("grounding_dino", "sam", "owlv2")]
    if models.grounding_dino.config != TINY:
        parts["grounding_dino"] = [_file_identity(models.grounding_dino.checkpoint)]
        if Path(models.grounding_dino.config).is_file():
            parts["grounding_dino"].append(_file_identity(models.grounding_dino.config))
    if models.sam.model_type != TINY:
        parts["sam"] = _file_identity(models.sam.checkpoint)
    if models.owlv2 != TINY:
        parts["owlv2"] = _source_identity(models.owlv2)
    if models.clip_selector:
        parts["clip_selector"] = _source_identity(models.clip_selector)
    if tiny_dirs:
        parts["tiny"] = f"{tree_hash(tiny_dirs)};{_library_versions()}"
    return value_hash(parts)
