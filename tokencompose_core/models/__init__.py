"""Model profiles: one place that builds or loads every model the pipeline uses.

Two kinds of profile (``ModelsConfig.kind``):

* ``tiny``: random-initialised, seeded models built from architecture configs in
  ``configs/models/`` — no network, no weights. Used by tests and the demo.
* ``pretrained``: real weights — a Stable Diffusion (1.x, 2.x or XL), SD 3 / 3.5 or FLUX
  hub id or local diffusers directory (and ``models.vae``, an optional replacement VAE), GroundingDINO
  and SAM checkpoint files, an OWLv2 hub id or directory.
  Everything is read offline; a missing file raises :class:`MissingWeightsError`
  naming the file and how to get it. A real profile never falls back to random
  weights.

Benchmarks pass ``random_weights=True`` (or ``diffusion: sd14-random``) to get the
full-size architectures with random weights, still offline.

Checkpoints are read with safetensors or ``torch.load(weights_only=True)``, never
with plain pickle.

Modules: ``tokenizers`` (CLIP/OWLv2/BERT, offline), ``tiny`` (seeded random-init
factories), ``weights`` (reading real checkpoints and hub snapshots), ``loaders``
(the public loaders and ``fingerprint``), ``mmdit`` (SD 3 and FLUX: loading, text layout,
conditioning), ``t5_vocab`` (builds the tiny MMDiT profiles' T5 tokenizer), ``architectures`` (the ``configs/models/``
folders). Import public names from this package.
"""

from tokencompose_core.models.loaders import (
    DiffusionParts,
    diffusion_family,
    fingerprint,
    load_diffusion,
    load_grounding_dino,
    load_owlv2,
    load_owlvit,
    load_sam,
    resolve_diffusion_dir,
    resolve_vae_dir,
    sam_package,
    vae_dtype,
)
from tokencompose_core.models.mmdit import (
    MMDiTParts,
    MMDiTText,
    TextSegment,
    encoder_text,
    is_mmdit,
    load_mmdit,
    mmdit_family,
    text_layout,
)
from tokencompose_core.models.tokenizers import clip_tokenizer, clip_tokenizer_2
from tokencompose_core.models.weights import MissingWeightsError, UnsafeCheckpointError, load_state_dict_file

__all__ = [
    "DiffusionParts",
    "MMDiTParts",
    "MMDiTText",
    "MissingWeightsError",
    "TextSegment",
    "UnsafeCheckpointError",
    "clip_tokenizer",
    "clip_tokenizer_2",
    "diffusion_family",
    "encoder_text",
    "fingerprint",
    "is_mmdit",
    "load_diffusion",
    "load_grounding_dino",
    "load_mmdit",
    "load_owlv2",
    "load_owlvit",
    "load_sam",
    "load_state_dict_file",
    "mmdit_family",
    "resolve_diffusion_dir",
    "resolve_vae_dir",
    "sam_package",
    "text_layout",
    "vae_dtype",
]
