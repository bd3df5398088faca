"""Real weights: where to download them, and reading them safely and completely.

Checkpoints are read with safetensors or ``torch.load(weights_only=True)``, never
with plain pickle; a checkpoint that leaves any parameter of the model unset is an
error, never a partly random model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

GDINO_RELEASES = "https://github.com/IDEA-Research/GroundingDINO/releases"
GDINO_SWINT_OGC_URL = f"{GDINO_RELEASES}/download/v0.1.0-alpha/groundingdino_swint_ogc.pth"
SAM_CHECKPOINT_URLS = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}
SAM_HQ_CHECKPOINT_URLS = {
    "vit_h": "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_h.pth",
    "vit_l": "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_l.pth",
    "vit_b": "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_b.pth",
}
# Buffers that older checkpoints store but transformers 5 no longer persists.
_BENIGN_UNEXPECTED_SUFFIXES = ("position_ids", "token_type_ids")


class MissingWeightsError(FileNotFoundError):
    """A real profile needs a weight file or hub snapshot that is not on this machine."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds more than tensors (a pickle that could run code) and was refused."""


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


def load_exact(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights; any missing parameter is an error (never a partly random model)."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    unexpected = [k for k in unexpected if not k.endswith(_BENIGN_UNEXPECTED_SUFFIXES)]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model architecture: "
            f"{len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )


def require_weights(folder: Path) -> Path:
    """``folder`` with a config and a weights file; otherwise :class:`MissingWeightsError` naming what is missing."""
    if not (folder / "config.json").is_file():
        raise MissingWeightsError(f"no {folder / 'config.json'}: the model folder is incomplete")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise MissingWeightsError(
            f"no weights in {folder} (expected e.g. {folder / 'model.safetensors'} or "
            f"{folder / 'diffusion_pytorch_model.safetensors'}); download the component's weights, "
            f"e.g. `huggingface-cli download <repo> --include '{folder.name}/*'`"
        )
    return folder


def vae_dtype(vae_config: Mapping[str, Any], dtype: torch.dtype) -> torch.dtype:
    """fp32 for a VAE that overflows in fp16 (its config says ``force_upcast``, as SDXL's does), else ``dtype``."""
    return torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", False) else dtype


def hub_snapshot(repo_id: str, what: str, how: str) -> str:
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
