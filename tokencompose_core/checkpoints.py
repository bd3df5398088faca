"""A training run's folder on disk: checkpoints written atomically and resumed exactly,
damaged ones passed over, and the final U-Net published.

Layout of ``<root>/train/<run>`` (see tokencompose_core.train)::

    unet/                        final U-Net (EMA weights when EMA is on), safetensors
    transformer/                 instead of unet/ for an MMDiT model (SD 3.5, FLUX)
    lora/                        instead of either when train.lora.rank > 0: the adapter (tokencompose_core.lora)
    checkpoints/checkpoint-<N>/  unet/ (or transformer/ or lora/), optimizer.pt, lr_scheduler.pt, ema.pt,
                                 rng-<rank>.pt, state.json,
                                 _manifest.json (sizes and sha256 of the others, written last)

A checkpoint is built in a hidden temporary folder and renamed into place, so a
killed run never leaves a half checkpoint; resuming takes the newest whole one
(its files match its manifest and load).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import pickle
import posixpath
import random
import shutil
import uuid
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError, safe_open

from tokencompose_core import lora, outputs, storage

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


def local_path(uri: str) -> str:
    fs, path = storage.filesystem(uri)
    if not storage.is_local(fs):
        raise ValueError(
            f"training output {uri!r} must be a local or mounted path: checkpoints are published "
            "by renaming a finished folder, which object stores cannot do atomically"
        )
    return path


def checkpoint_steps(output_dir: str) -> list[int]:
    """Steps of the complete checkpoints in ``output_dir``, ascending."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        if name.startswith(CHECKPOINT_PREFIX) and os.path.isfile(os.path.join(root, name, "state.json")):
            steps.append(int(name[len(CHECKPOINT_PREFIX) :]))
    return sorted(steps)


def _remove_checkpoint(path: str) -> None:
    """Unlist a checkpoint with one rename to a ``.tmp-`` name, then delete it: a run killed
    half-way through the deletion must not leave a listed checkpoint with files missing."""
    if os.path.isdir(path):
        doomed = os.path.join(os.path.dirname(path), f".tmp-removed-{os.path.basename(path)}-{uuid.uuid4().hex}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def remove_partial_checkpoints(output_dir: str) -> None:
    """Delete temporary folders a killed run left behind (they are never resumed from)."""
    root = os.path.join(output_dir, "checkpoints")
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"{CHECKPOINT_PREFIX}{step}")


def _torch_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def load_torch(path: str):
    return torch.load(path, map_location="cpu", weights_only=True)


def _rng_state(noise: torch.Generator) -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "noise": noise.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, noise: torch.Generator) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    noise.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainingState:
    """What a checkpoint holds, besides the data position (derived from the step)."""

    accelerator: Accelerator
    unet: torch.nn.Module  # prepared (possibly DDP-wrapped)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel | None
    noise: torch.Generator

    def save(self, output_dir: str, step: int, state: dict, keep: int | None) -> None:
        """Write checkpoint-<step> atomically (all processes call this)."""
        acc = self.accelerator
        final = checkpoint_dir(output_dir, step)
        temp = os.path.join(output_dir, "checkpoints", f".tmp-{CHECKPOINT_PREFIX}{step}")
        if acc.is_main_process:
            shutil.rmtree(temp, ignore_errors=True)
            os.makedirs(temp)
        acc.wait_for_everyone()
        storage.atomic_write_bytes(
            os.path.join(temp, f"rng-{acc.process_index}.pt"), _torch_bytes(_rng_state(self.noise))
        )
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_weights(acc.unwrap_model(self.unet), temp)
            storage.atomic_write_bytes(os.path.join(temp, "optimizer.pt"), _torch_bytes(self.optimizer.state_dict()))
            storage.atomic_write_bytes(
                os.path.join(temp, "lr_scheduler.pt"), _torch_bytes(self.lr_scheduler.state_dict())
            )
            if self.ema is not None:
                storage.atomic_write_bytes(os.path.join(temp, "ema.pt"), _torch_bytes(self.ema.state_dict()))
            storage.atomic_write_json(os.path.join(temp, "state.json"), {**state, "global_step": step})
            outputs.write_manifest(temp)  # last: it vouches for every file above, every process's RNG too
            _remove_checkpoint(final)
            os.replace(temp, final)
            for old in checkpoint_steps(output_dir)[: -keep] if keep else []:
                _remove_checkpoint(checkpoint_dir(output_dir, old))
        acc.wait_for_everyone()

    def restore(self, checkpoint: "Checkpoint") -> dict:
        """Restore everything but the U-Net weights (loaded with the model: :func:`weights_dir`)
        from a read checkpoint."""
        states = checkpoint.states
        self.optimizer.load_state_dict(states["optimizer"])
        self.lr_scheduler.load_state_dict(states["lr_scheduler"])
        if self.ema is not None:
            if "ema" in states:
                self.ema.load_state_dict(states["ema"])
                self.ema.to(self.accelerator.device)
            else:
                logger.warning("checkpoint %s has no EMA state; EMA restarts from the current weights",
                               checkpoint.path)
        if "rng" in states:
            _set_rng_state(states["rng"], self.noise)
        else:  # resumed on more processes than saved: data order is still exact, noise is not
            logger.warning("no RNG state for process %d in %s", self.accelerator.process_index, checkpoint.path)
        return checkpoint.state


class CheckpointError(RuntimeError):
    """Checkpoints exist but none is whole; the message names each one and what is wrong with it."""


@dataclass
class Checkpoint:
    """A checkpoint verified and read before the model is built, so a damaged one is passed over."""

    path: str
    state: dict  # state.json
    states: dict  # "optimizer", "lr_scheduler", "ema", "rng" (this process's) -> loaded state


class _Damaged(Exception):
    """A checkpoint file that does not load; the message names the file."""


# What a damaged file raises on load: pickle/zip errors, truncated data, unreadable or missing files.
_LOAD_ERRORS = (pickle.UnpicklingError, SafetensorError, RuntimeError, EOFError, OSError, ValueError, KeyError,
                TypeError)


def _read_checkpoint(path: str, process_index: int) -> Checkpoint:
    """Load a checkpoint's states (and the U-Net files' headers); :class:`_Damaged` names the file that fails."""
    files = {"optimizer": "optimizer.pt", "lr_scheduler": "lr_scheduler.pt", "ema": "ema.pt",
             "rng": f"rng-{process_index}.pt"}
    optional = {"ema", "rng"}  # EMA off; resumed on more processes than saved
    states = {}
    current = os.path.join(path, "state.json")
    try:
        state = storage.read_json(current)
        for key, name in files.items():
            current = os.path.join(path, name)
            if key in optional and not os.path.isfile(current):
                continue
            states[key] = load_torch(current)
        weights_folder = weights_dir(path)
        for current in sorted(glob.glob(os.path.join(weights_folder, "*.safetensors"))) or [weights_folder]:
            with safe_open(current, framework="pt") as weights:  # reads the header only
                weights.keys()
        if not lora.is_lora_folder(weights_folder):
            current = os.path.join(weights_folder, "config.json")
            storage.read_json(current)
    except _LOAD_ERRORS as error:
        raise _Damaged(f"{current}: {type(error).__name__}: {error}".splitlines()[0]) from error
    return Checkpoint(path, state, states)


def _checkpoint_problems(path: str) -> list[str]:
    if not outputs.has_manifest(path):
        # Written before checkpoints had manifests: only a failed load can show damage.
        logger.warning("checkpoint %s has no %s; resuming from it unverified", path, outputs.MANIFEST_NAME)
        return []
    return outputs.verify_manifest(path, deep=True)


def resume_checkpoint(output_dir: str, enabled: bool, process_index: int) -> Checkpoint | None:
    """The newest whole checkpoint, read; damaged newer ones are passed over with a warning.

    Raises :class:`CheckpointError` when checkpoints exist but none is whole.
    """
    damaged = []
    for step in reversed(checkpoint_steps(output_dir) if enabled else []):
        path = checkpoint_dir(output_dir, step)
        problems = _checkpoint_problems(path)
        if not problems:
            try:
                return _read_checkpoint(path, process_index)
            except _Damaged as error:
                problems = [str(error)]
        logger.warning("checkpoint %s is damaged, trying an older one: %s", path, "; ".join(problems))
        damaged.append(f"{path} ({'; '.join(problems)})")
    if damaged:
        raise CheckpointError(f"no whole checkpoint to resume from: {', '.join(damaged)}; "
                              "delete them, or set train.resume=false to start over")
    return None


def _drop_load_path(config_path: str) -> None:
    """Remove ``_name_or_path`` (where the weights were loaded from: the base model, or a
    checkpoint when a lost ``unet/`` is restored) so the published U-Net's bytes depend
    on its weights and architecture alone, and its content identity with them."""
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config.pop("_name_or_path", None)
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")


# The denoiser's folder, named as in the model's own diffusers layout.
DENOISER_DIRS = ("unet", "transformer")


def denoiser_dir_name(model: torch.nn.Module) -> str:
    """``unet`` for a U-Net, ``transformer`` for an MMDiT (SD 3.5, FLUX): its folder in a diffusers layout."""
    from diffusers import UNet2DConditionModel

    return "unet" if isinstance(model, UNet2DConditionModel) else "transformer"


def weights_dir(folder: str) -> str:
    """Where a run or checkpoint folder keeps its weights: ``lora/`` for a LoRA run, else ``unet/``
    (or ``transformer/``, whichever holds a model)."""
    adapter = os.path.join(folder, lora.LORA_DIR)
    if lora.is_lora_folder(adapter):
        return adapter
    found = [name for name in DENOISER_DIRS if os.path.isfile(os.path.join(folder, name, "config.json"))]
    return os.path.join(folder, found[0] if found else DENOISER_DIRS[0])


def save_weights(model: torch.nn.Module, folder: str) -> str:
    """Save a LoRA model's adapter to ``folder/lora``, any other whole to ``folder/unet`` (or ``transformer``)."""
    if lora.has_lora(model):
        target = os.path.join(folder, lora.LORA_DIR)
        lora.save_lora(model, target)
    else:
        target = os.path.join(folder, denoiser_dir_name(model))
        model.save_pretrained(target, safe_serialization=True)
    return target


def publish_unet(unet: torch.nn.Module, output_dir: str) -> str:
    """Save the final U-Net (``unet/``, or ``lora/`` for a LoRA run) by renaming a finished
    folder over the old one."""
    temp = os.path.join(output_dir, f".tmp-unet-{uuid.uuid4().hex}")
    saved = save_weights(unet, temp)
    if not lora.has_lora(unet):
        _drop_load_path(os.path.join(saved, "config.json"))
    final = os.path.join(output_dir, os.path.basename(saved))
    old = None
    if os.path.exists(final):
        old = os.path.join(output_dir, f".old-unet-{uuid.uuid4().hex}")
        os.replace(final, old)
    os.replace(saved, final)
    shutil.rmtree(temp, ignore_errors=True)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return final


def weights_complete(folder: str) -> bool:
    """A published ``unet/`` or ``lora/`` folder holds all its weights: a LoRA adapter's file,
    or a U-Net's config and its weights file (every shard its index names, for a sharded save)."""
    if lora.is_lora_folder(folder):
        return True
    single = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return False
    if os.path.isfile(single):
        return True
    try:
        with open(f"{single}.index.json", encoding="utf-8") as index:
            shards = set(json.load(index)["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return all(os.path.isfile(os.path.join(folder, shard)) for shard in shards)


def result_files(output_uri: str) -> list[str]:
    """A finished run's result, relative to its folder: the final ``unet/`` or ``lora/`` and the
    metrics (checkpoints are the way there, not the result). Refuses a run whose published
    weights are incomplete: its record must never stand for weights that are not there."""
    output_dir = local_path(output_uri)
    if not any(weights_complete(os.path.join(output_dir, name)) for name in (*DENOISER_DIRS, lora.LORA_DIR)):
        raise CheckpointError(f"{output_uri}: the published weights (unet/, transformer/ or lora/) are incomplete; "
                              "run `tokencompose train` again to publish them from the last checkpoint")
    fs, base = storage.filesystem(output_uri)
    weights = [posixpath.relpath(path, base) for folder in (*DENOISER_DIRS, lora.LORA_DIR)
               for path in sorted(fs.find(posixpath.join(base, folder)))]
    return weights + [name for name in ("metrics.jsonl", "loss_curve.png") if fs.exists(posixpath.join(base, name))]
