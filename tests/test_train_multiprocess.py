"""Training under ``accelerate launch`` with two CPU processes (gloo): kill, then resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from helpers import free_port, make_cache
from tokencompose_core.checkpoints import checkpoint_dir, checkpoint_steps


def _launch(cache: str, output: Path, log: Path, *overrides: str) -> subprocess.Popen:
    # accelerate 1.x: `--cpu` alone starts a single process (several need mpirun); torchrun
    # workers (`--multi_gpu`) with ACCELERATE_USE_CPU become a MULTI_CPU (gloo) group.
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "tokencompose_core.train", "-p", "tiny", "--cache", cache, "--output", str(output),
        f"storage.root={output.parent}", "train.checkpoint_every=2", "train.checkpoints_total_limit=2",
        "train.batch_size=1", *overrides,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # A session of its own, so the test can stop the launcher and both workers together.
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _kill(launcher: subprocess.Popen) -> None:
    """SIGKILL the workers (torchrun starts each in a session of its own), then the launcher."""
    workers = psutil.Process(launcher.pid).children(recursive=True)
    for worker in workers:
        worker.kill()
    psutil.wait_procs(workers, timeout=30)
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()


def test_two_process_training_is_killed_and_resumes(tmp_path):
    cache = make_cache(tmp_path / "data")
    output = tmp_path / "run"
    first = _launch(cache, output, tmp_path / "first.log", "train.max_steps=200")
    deadline = time.monotonic() + 120
    try:
        while not checkpoint_steps(str(output)) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        _kill(first)
    steps = checkpoint_steps(str(output))
    assert steps, (tmp_path / "first.log").read_text()[-3000:]
    stopped = steps[-1]
    assert stopped < 200  # it really was interrupted
    saved = Path(checkpoint_dir(str(output), stopped))
    assert {"rng-0.pt", "rng-1.pt", "optimizer.pt", "lr_scheduler.pt", "state.json"} <= set(os.listdir(saved))
    optimizer = torch.load(saved / "optimizer.pt", weights_only=True)
    assert optimizer["state"] and json.loads((saved / "state.json").read_text())["global_step"] == stopped

    second = _launch(cache, output, tmp_path / "second.log", f"train.max_steps={stopped + 2}")
    assert second.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    assert f"at step {stopped}" in log, log[-3000:]  # resumed, not restarted
    assert checkpoint_steps(str(output))[-1] == stopped + 2
    steps_logged = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, stopped + 3))

    from diffusers import UNet2DConditionModel

    final = UNet2DConditionModel.from_pretrained(output / "unet")
    resumed = UNet2DConditionModel.from_pretrained(saved / "unet")
    changed = [name for name, p in final.state_dict().items() if not torch.equal(p, resumed.state_dict()[name])]
    assert changed  # the two resumed steps trained the model further
