"""Training on several processes from the pipeline: the same loop under ``accelerate launch``.

``train.num_processes`` (None: every visible GPU, 1 on a CPU machine) processes run
:func:`tokencompose_core.train.train` together in the run folder the train task owns,
so the run has the same folder, checkpoints, exact resume and cache key as a
single-process one. On a machine without CUDA the processes form a gloo group (what
the tests use). Several machines: accelerate's own settings (``accelerate config``),
see docs/DEPLOY.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tokencompose_core import storage
from tokencompose_core.config import ModelsConfig, TrainConfig
from tokencompose_core.network import free_port

SETTINGS_FILE = ".launch-settings.json"  # hidden: not part of the run's result
RESULT_FILE = ".launch-result.json"
LOG_FILE = ".launch.log"


def resolve_num_processes(setting: int | None) -> int:
    """``train.num_processes``: as set, else one per visible CUDA device (1 without CUDA)."""
    if setting is not None:
        return setting
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def launch(cfg: TrainConfig, models: ModelsConfig, cache_uri: str, output_uri: str, heldout_images: int,
           processes: int) -> dict:
    """Train with ``processes`` processes under ``accelerate launch``; the result as
    :class:`tokencompose_core.train.TrainResult` fields. The processes' output goes to
    ``<run>/.launch.log``; a run that fails raises :class:`ChildProcessError` (retried by the
    train task, which then resumes from the newest checkpoint)."""
    fs, path = storage.filesystem(output_uri)
    if not storage.is_local(fs):
        raise ValueError(f"training output {output_uri!r} must be a local or mounted path")
    output_dir = Path(path)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = output_dir / SETTINGS_FILE
    storage.atomic_write_json(str(settings), {"train": cfg.model_dump(mode="json"),
                                              "models": models.model_dump(mode="json"),
                                              "heldout_images": heldout_images})
    result = output_dir / RESULT_FILE
    result.unlink(missing_ok=True)
    log = output_dir / LOG_FILE
    with log.open("a", encoding="utf-8") as handle:
        done = subprocess.run(_command(cfg, processes, settings, cache_uri, output_uri), env=_environment(cfg),
                              stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0 or not result.is_file():
        raise ChildProcessError(f"training on {processes} processes failed (exit {done.returncode}); see {log}")
    return json.loads(result.read_text(encoding="utf-8"))


def _command(cfg: TrainConfig, processes: int, settings: Path, cache_uri: str, output_uri: str) -> list[str]:
    # With ACCELERATE_USE_CPU, torchrun's workers (--multi_gpu) become one gloo group.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", cfg.mixed_precision, "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "tokencompose_core.train", "--settings", str(settings),
            "--cache", cache_uri, "--output", output_uri]


def _environment(cfg: TrainConfig) -> dict[str, str]:
    import torch

    import tokencompose_core

    # The processes import this very code, wherever the caller imported it from.
    code = str(Path(tokencompose_core.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")]))}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(cfg.torch_threads or 1))
    return env
