"""Models stage 5 scores images with: Inception-v3 for FID, CLIP for CLIP score.

``"tiny"`` builds a seeded random-init model offline (tests, the tiny profile); any
other value is a real model read from disk, and a missing one raises
:class:`MissingWeightsError` naming it and where to get it.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from tokencompose_core.models.architectures import TINY, arch_dir, read_config_json
from tokencompose_core.models.tiny import seeded_init
from tokencompose_core.models.tokenizers import clip_tokenizer
from tokencompose_core.models.weights import MissingWeightsError, hub_snapshot, load_exact, load_state_dict_file

# The FID network: the TF 2015 Inception graph FID is defined on, ported to PyTorch
# (pytorch-fid's release, the weights torch-fidelity and torchmetrics use too). Its
# parameter names are torchvision's Inception-v3 names, with a 1008-class head.
FID_INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_SIDE = 299
FID_CLASSES = 1008


# Feature layers FID can compare (torch-fidelity's and torchmetrics' choices): the block
# after which features are average-pooled. 2048 (pool3) is the standard FID; the
# smaller ones make FID's matrix square root cheap for tiny runs of a few images.
FEATURE_LAYERS = {64: "maxpool1", 192: "maxpool2", 768: "Mixed_6e", 2048: "Mixed_7c"}


class _PaddingExcludedAverage:
    """The TF graph FID is defined on pools the pooling branch of these Inception blocks with an
    average that does not count the padding (torchvision's counts it): only border pixels
    differ, but every feature after them does."""

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branches = super()._forward(x)  # type: ignore[misc]
        branches[-1] = self.branch_pool(self._pool(x))  # torchvision puts the pooling branch last
        return branches


class _MaxPooledBranch(_PaddingExcludedAverage):
    """The graph's last block (Mixed_7c) max-pools that branch instead."""

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


@cache
def _fid_block_classes() -> dict[str, type]:
    """Mixed block name -> its class in the FID graph (torchvision imported on first use)."""
    from torchvision.models import inception

    average_a = type("FIDInceptionA", (_PaddingExcludedAverage, inception.InceptionA), {})
    average_c = type("FIDInceptionC", (_PaddingExcludedAverage, inception.InceptionC), {})
    return {"Mixed_5b": average_a, "Mixed_5c": average_a, "Mixed_5d": average_a,
            **{f"Mixed_6{x}": average_c for x in "bcde"},
            "Mixed_7b": type("FIDInceptionE1", (_PaddingExcludedAverage, inception.InceptionE), {}),
            "Mixed_7c": type("FIDInceptionE2", (_MaxPooledBranch, inception.InceptionE), {})}


def _fid_blocks(network: nn.Module) -> nn.Module:
    """torchvision's Inception-v3 with the FID graph's pooling in its mixed blocks (same
    parameters, so the same weights load): the features pytorch-fid, torch-fidelity and
    torchmetrics compute from ``pt_inception-2015-12-05``."""
    for name, cls in _fid_block_classes().items():
        getattr(network, name).__class__ = cls
    return network


class InceptionFeatures(nn.Module):
    """Average-pooled Inception-v3 features of uint8 images (N, 3, H, W); 2048 = pool3.

    Images not yet 299 px (torchmetrics probes with one) are resized bilinearly; all are
    scaled to [-1, 1], the TF graph's input.
    ``num_features`` is what torchmetrics' FID reads off a custom feature module."""

    def __init__(self, network: nn.Module, num_features: int = 2048) -> None:
        super().__init__()
        last = FEATURE_LAYERS[num_features]
        layers = []
        for name, layer in network.named_children():
            if layer is not None and not isinstance(layer, nn.AdaptiveAvgPool2d):
                layers.append(layer)
            if name == last:
                break
        self.layers = nn.Sequential(*layers).eval()
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        x = F.interpolate(x, size=(INCEPTION_SIDE, INCEPTION_SIDE), mode="bilinear", align_corners=False)
        return F.adaptive_avg_pool2d(self.layers(x * 2.0 - 1.0), 1).flatten(1)


def load_inception(weights: str, seed: int = 0, num_features: int = 2048) -> InceptionFeatures:
    """FID's Inception: ``"tiny"`` = seeded random init, else a ``.pth``/``.safetensors`` file;
    features of the layer of ``num_features`` (:data:`FEATURE_LAYERS`)."""
    from torchvision.models import inception_v3

    def build() -> nn.Module:
        return _fid_blocks(inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=FID_CLASSES,
                                        transform_input=False))

    if weights == TINY:
        with seeded_init(seed, "inception"):
            network = build()
            # torchvision's init (std 0.1) assumes trained batch norms; with untrained ones
            # (identity in eval) activations grow ~1e10 over the 90 layers and the Fréchet
            # distance drowns in rounding. He init keeps them near unit scale.
            for module in network.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            return InceptionFeatures(network, num_features)
    if not os.path.isfile(weights):
        raise MissingWeightsError(
            f"FID Inception weights not found: {weights} (score.inception_weights). "
            f"Download {FID_INCEPTION_URL} and set score.inception_weights to its path.")
    network = build()
    load_exact(network, load_state_dict_file(weights), weights)
    return InceptionFeatures(network, num_features)


def load_clip(source: str, seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """CLIP for CLIP score: ``"tiny"`` = seeded random init from configs/models/tiny/clip,
    else a local folder or a hub id in the local cache (openai/clip-vit-large-patch14)."""
    if source == TINY:
        config = CLIPConfig.from_dict(read_config_json(arch_dir(TINY) / "clip" / "config.json"))
        with seeded_init(seed, "clip"):
            model = CLIPModel(config)
        side = config.vision_config.image_size
        processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": side},
                                                                     crop_size={"height": side, "width": side}),
                                  tokenizer=clip_tokenizer())
        return model.eval(), processor
    folder = source if os.path.isdir(source) else hub_snapshot(source, "CLIP model (score.clip_model)", "")
    return (CLIPModel.from_pretrained(folder, local_files_only=True).eval(),
            CLIPProcessor.from_pretrained(folder, local_files_only=True))


def scorer_identity(weights: str) -> Any:
    """What a reference-statistics cache depends on: the network's file (or tiny's build)."""
    from tokencompose_core.models.loaders import file_identity
    from tokencompose_core.models.tiny import library_versions

    return f"tiny;{library_versions()}" if weights == TINY else file_identity(weights)


def scorers_fingerprint(inception_weights: str, clip_model: str) -> str:
    """Identity of stage 5's scoring networks beyond their names: the Inception file,
    the CLIP folder or cached revision, or the tiny architectures and library versions."""
    from tokencompose_core.identity import folders_identity, value_hash
    from tokencompose_core.models.loaders import source_identity

    clip = f"{folders_identity([arch_dir(TINY) / 'clip'])};{scorer_identity(TINY)}" if clip_model == TINY \
        else source_identity(clip_model)
    return value_hash({"inception": scorer_identity(inception_weights), "clip": clip})
