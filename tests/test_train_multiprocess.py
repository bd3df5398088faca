"""Training on two CPU processes (gloo) from `tokencompose run`: a process killed, the run resumed, then cached."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from helpers import PIPELINE_SETTINGS, photo_manifest, run_pipeline, stage_folders
from tokencompose_core.checkpoints import checkpoint_dir, checkpoint_steps
from tokencompose_core.launch import LOG_FILE


def _kill_the_training_processes_after_a_checkpoint(root: Path, killed: dict) -> None:
    """SIGKILL the accelerate launcher and its workers once a run has a checkpoint: a lost node."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        runs = [run for run in (root / "train").glob("*") if checkpoint_steps(str(run))]
        launchers = [p for p in psutil.Process().children(recursive=True)
                     if "accelerate.commands.launch" in " ".join(p.cmdline())]
        if runs and launchers:
            killed["step"] = checkpoint_steps(str(runs[0]))[-1]
            processes = [child for launcher in launchers for child in launcher.children(recursive=True)] + launchers
            for process in processes:
                process.kill()
            psutil.wait_procs(processes, timeout=30)
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_two_process_training_survives_a_killed_process_and_is_then_cached(prefect_harness, tmp_path):
    """`tokencompose run -p tiny train.num_processes=2` on the CPU: both processes train (rng state
    per rank), a kill of every training process fails the train task, whose retry resumes from the
    newest checkpoint rather than restarting, the rest of the DAG follows, and the same command
    again is all cache hits."""
    root = tmp_path / "root"
    manifest = photo_manifest(tmp_path)
    overrides = [f"storage.root={root}", *PIPELINE_SETTINGS, "score.heldout_images=1", "train.num_processes=2",
                 "train.max_steps=12", "train.checkpoint_every=2", "train.checkpoints_total_limit=2",
                 "train.batch_size=1", "train.log_every=1"]
    killed: dict = {}
    killer = threading.Thread(target=_kill_the_training_processes_after_a_checkpoint, args=(root, killed))
    killer.start()
    pipeline, states = run_pipeline(manifest, overrides)
    assert all("Completed" in names for names in states.values()), states
    killer.join()
    summary = pipeline["stages"]["train"]["summary"]
    run = Path(summary["output_uri"])
    log = (run / LOG_FILE).read_text()
    assert killed and killed["step"] < 12, log[-3000:]  # it really was interrupted
    assert f"at step {killed['step']}" in log, log[-3000:]  # the retry resumed, not restarted
    assert summary["global_step"] == 12 and checkpoint_steps(str(run))[-1] == 12
    steps_logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, 13))
    saved = Path(checkpoint_dir(str(run), 12))
    assert {"rng-0.pt", "rng-1.pt", "optimizer.pt", "lr_scheduler.pt", "state.json"} <= set(os.listdir(saved))
    optimizer = torch.load(saved / "optimizer.pt", weights_only=True)
    assert optimizer["state"] and json.loads((saved / "state.json").read_text())["global_step"] == 12

    from diffusers import UNet2DConditionModel

    final = UNet2DConditionModel.from_pretrained(run / "unet")
    at_kill = UNet2DConditionModel.from_pretrained(Path(checkpoint_dir(str(run), 10)) / "unet")
    changed = [name for name, p in final.state_dict().items() if not torch.equal(p, at_kill.state_dict()[name])]
    assert changed  # the steps after the kill trained the model further

    again, states = run_pipeline(manifest, overrides)
    assert states == {stage: {"Cached"} for stage in states} and stage_folders(again) == stage_folders(pipeline)
