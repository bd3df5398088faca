"""Deployments: prefect.yaml, the serve entry point, re-evaluation, and a real server + worker run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prefect.workers.process import ProcessWorker

from deployments.serve import PREFECT_YAML, REPO_ROOT, build_deployments, deployment_specs, roots_override
from flows.reevaluate import reevaluate_flow
from tokencompose_core.reevaluation import newest_checkpoint
from tokencompose_core import storage
from tokencompose_core.config import load_config
from tokencompose_core.network import free_port
from tokencompose_core.models import resolve_diffusion_dir

PREFECT = str(Path(sys.executable).with_name("prefect"))
# The whole server test (start, deploy, run, shut down) ends within this (seconds);
# raise it on a crowded machine.
SERVER_TEST_BUDGET_S = float(os.environ.get("TOKENCOMPOSE_SERVER_TEST_BUDGET_S", "300"))


def _quick_overrides(root: Path) -> list[str]:
    """The quick-eval deployment's overrides with its storage root, and so its allowed roots, moved to ``root``."""
    spec = next(s for s in deployment_specs() if s["name"] == "quick-eval")
    return [f"storage.root={root}", *spec["parameters"]["overrides"], f"storage.allowed_roots=[{root}]"]


def _fake_checkpoint(root: Path, overrides: list[str], name: str) -> Path:
    """A trained-run folder holding the tiny base U-Net (what sampling loads)."""
    model_dir = resolve_diffusion_dir(load_config("tiny", overrides).models)
    target = root / "train" / name / "unet"
    shutil.copytree(Path(model_dir) / "unet", target)
    return target.parent


def test_serve_builds_the_prefect_yaml_deployments():
    deployments = {d.name: d for d in build_deployments(profile="sd21")}
    assert set(deployments) == {"pipeline", "train", "reevaluate", "quick-eval"}
    assert deployments["pipeline"].entrypoint.endswith("flows/pipeline.py:pipeline_flow")
    assert deployments["train"].parameters["profile"] == "sd21"
    assert deployments["quick-eval"].parameters["profile"] == "tiny", "the smoke deployment stays tiny"
    (schedule,) = deployments["reevaluate"].schedules
    assert schedule.schedule.cron == "0 3 * * *"
    for deployment in deployments.values():  # every entrypoint keeps the stage-flow signature
        schema = deployment._parameter_openapi_schema.properties
        assert {"profile", "overrides", "input_uri"} <= set(schema), deployment.name


def test_every_deployment_confines_its_runs_to_its_profiles_roots(tmp_path):
    from flows.preprocess import nouns_flow

    outside = tmp_path / "manifest.jsonl"
    outside.write_text('{"image": "a.png", "captions": "a dog"}\n')
    for spec in deployment_specs():  # in the file itself, so that `prefect deploy` gets it too
        parameters = spec["parameters"]
        assert roots_override(parameters["profile"]) in parameters["overrides"], spec["name"]
        config = load_config(parameters["profile"], parameters["overrides"])
        assert config.storage.allowed_roots == [config.storage.root], spec["name"]
        with pytest.raises(ValueError, match="outside the configured storage roots"):
            nouns_flow.fn(parameters["profile"], parameters["overrides"], input_uri=str(outside))
    served = {d.name: d.parameters["overrides"] for d in build_deployments(profile="sd21")}
    assert served["pipeline"][0] == roots_override("sd21") == 'storage.allowed_roots=["runs/sd21"]'
    assert not any("runs/sd14" in override for overrides in served.values() for override in overrides)
    assert roots_override("tiny") in served["quick-eval"]


def test_reevaluation_compares_with_the_previous_checkpoint(prefect_harness, tmp_path):
    overrides = _quick_overrides(tmp_path)
    first = _fake_checkpoint(tmp_path, overrides, "run-a")
    result = reevaluate_flow("tiny", overrides)
    assert result["checkpoint"] == str(first) and result["previous"] is None
    assert all(row["previous"] is None and row["current"] is not None for row in result["comparison"])

    time.sleep(0.05)  # distinct modification times
    second = _fake_checkpoint(tmp_path, overrides, "run-b/checkpoints/checkpoint-10")
    time.sleep(0.05)
    _fake_checkpoint(tmp_path, overrides, "run-b/checkpoints/.tmp-checkpoint-20")  # still being written
    assert newest_checkpoint(load_config("tiny", overrides)) == str(second)
    result = reevaluate_flow("tiny", overrides)
    assert result["checkpoint"] == str(second) and result["previous"] == str(first)
    # Same weights, same seeds: the scores match and every change is zero.
    assert {row["metric"] for row in result["comparison"]} >= {"coco MG2", "coco MG5"}
    assert all(row["change"] == 0 for row in result["comparison"])
    history = storage.read_json(result["history_uri"])
    assert [entry["checkpoint"] for entry in history] == [str(first), str(second)]


def test_reevaluation_without_a_checkpoint_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained U-Net under .*train"):
        newest_checkpoint(load_config("tiny", [f"storage.root={tmp_path}"]))


# ---------------------------------------------------------------------------
# A real Prefect server on loopback, a process work pool, a worker, one run.
# ---------------------------------------------------------------------------


def _prefect(args: list[str], env: dict[str, str], timeout: float) -> str:
    done = subprocess.run([PREFECT, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _stop(process: subprocess.Popen) -> None:
    """Stop a process we started and everything it started (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def _wait_healthy(api: str, server: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited: {server.stdout.read() if server.stdout else ''}"
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("prefect server did not become healthy in time")


def test_quick_eval_deployment_runs_on_a_real_server(tmp_path):
    deadline = time.monotonic() + SERVER_TEST_BUDGET_S
    port, home = free_port(), tmp_path / "prefect-home"
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
           "PREFECT_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
    root = tmp_path / "runs"
    overrides = _quick_overrides(root)

    processes: list[subprocess.Popen] = []
    phases: list[str] = []  # elapsed time per phase, for the failure message

    def phase(name: str) -> None:
        phases.append(f"{name} {SERVER_TEST_BUDGET_S - (deadline - time.monotonic()):.0f}s")

    try:
        processes.append(server := subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-services", "--no-ui"], env=env, cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True))
        checkpoint = _fake_checkpoint(root, overrides, "run-a")  # while the server starts
        _wait_healthy(api, server, deadline)
        phase("server up")
        pool = {"name": "tokencompose", "type": "process",
                "base_job_template": ProcessWorker.get_default_base_job_template()}
        httpx.post(f"{api}/work_pools/", json=pool, timeout=10).raise_for_status()
        _prefect(["deploy", "--prefect-file", str(PREFECT_YAML), "--name", "quick-eval"], env, timeout=90)
        phase("deployed")

        deployment = httpx.get(f"{api}/deployments/name/reevaluate/quick-eval", timeout=10).json()
        run = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", timeout=10,
                         json={"parameters": {"profile": "tiny", "overrides": overrides}}).json()
        # One poll picks the run up now; the worker exits once the run has finished.
        processes.append(worker := subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "tokencompose", "--type", "process", "--run-once"],
            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True))
        phase("run created")
        state = None
        while time.monotonic() < deadline:
            state = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=10).json()["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(1)
        phase("run ended")
        log = "" if worker.poll() is None else worker.stdout.read()
        assert state and state["type"] == "COMPLETED", f"run ended {state['name']}, {phases}; worker:\n{log}"
        history = storage.read_json(str(root / "reevaluations" / "history.json"))
        assert [entry["checkpoint"] for entry in history] == [str(checkpoint)]
        print("phases:", phases)
    finally:
        for process in reversed(processes):
            _stop(process)
    assert all(process.poll() is not None for process in processes)
