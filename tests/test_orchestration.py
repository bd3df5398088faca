"""Orchestration: cache hits on a re-run, precise invalidation, retries, runner choice."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

import flows.pipeline as pipeline
from helpers import subflow_task_states
from tasks.common import (ResultFiles, configured, is_transient, result_storage, retry_batch_size,
                          stage_task, task_runner)
from tokencompose_core import storage
from tokencompose_core.config import ConfigError, load_config
from tokencompose_core.stages import STAGES, stage_fingerprint

# ---------------------------------------------------------------------------
# A five-stage toy DAG with the real stages' contract: each stage flow loads the
# profile, runs one stage task on the upstream URI and returns {"output_uri": ...}.
# ---------------------------------------------------------------------------


@stage_task
def _toy_work(stage: str, upstream: str | None, out_uri: str, fingerprint: str) -> str:
    previous = storage.read_bytes(upstream).decode() if upstream else "manifest"
    storage.atomic_write_bytes(out_uri, f"{previous}>{stage}".encode())
    return out_uri


def _toy_stage(stage: str):
    @flow(name=f"toy-{stage}")
    def stage_flow(profile: str = "tiny", overrides: list[str] | None = None, input_uri: str | None = None) -> dict:
        config = load_config(profile, overrides)
        out = storage.join(config.storage.root, stage, "out.txt")
        fingerprint = stage_fingerprint(config, stage)
        return {STAGES[stage].output_key: _toy_work.submit(stage, input_uri, out, fingerprint).result()}

    return stage_flow


TOY_STAGES = {stage: _toy_stage(stage) for stage in STAGES}


def _run_pipeline(overrides: list[str]) -> tuple[dict, dict[str, list[str]]]:
    state = pipeline.pipeline_flow(profile="tiny", overrides=overrides, return_state=True)
    return state.result(), subflow_task_states(state.state_details.flow_run_id)


def test_rerun_is_all_cache_hits_and_a_change_reruns_only_downstream(prefect_harness, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "stage_flow", TOY_STAGES.__getitem__)
    base = [f"storage.root={tmp_path / 'root'}"]

    summary, first = _run_pipeline(base)
    assert first == {f"toy-{s}": ["Completed"] for s in STAGES}
    assert storage.read_bytes(summary["output_uri"]).decode() == "manifest>nouns>masks>train>sample>score"
    results = Path(summary["result_storage"])
    assert results.is_dir() and any(results.iterdir()), "results must persist under the profile's storage"

    _, second = _run_pipeline(base)
    assert second == {f"toy-{s}": ["Cached"] for s in STAGES}

    _, changed = _run_pipeline(base + ["train.learning_rate=3e-4"])
    assert changed == {"toy-nouns": ["Cached"], "toy-masks": ["Cached"], "toy-train": ["Completed"],
                       "toy-sample": ["Completed"], "toy-score": ["Completed"]}


def test_part_of_the_dag_and_bad_requests(prefect_harness, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "stage_flow", TOY_STAGES.__getitem__)
    overrides = [f"storage.root={tmp_path}"]
    upstream = tmp_path / "masks.txt"
    upstream.write_text("manifest>nouns>masks")
    state = pipeline.pipeline_flow("tiny", overrides, str(upstream), stages=["sample", "train"], return_state=True)
    assert list(state.result()["stages"]) == ["train", "sample"]
    assert set(subflow_task_states(state.state_details.flow_run_id)) == {"toy-train", "toy-sample"}
    assert storage.read_bytes(state.result()["output_uri"]).decode() == "manifest>nouns>masks>train>sample"

    with pytest.raises(ValueError, match="leave a gap"):
        pipeline.pipeline_flow("tiny", overrides, stages=["masks", "sample"])
    with pytest.raises(ConfigError, match="train.learning_rate"):
        pipeline.pipeline_flow(profile="tiny", overrides=["train.learning_rate=-1"])


# ---------------------------------------------------------------------------
# Retries
# ---------------------------------------------------------------------------


def _flaky(errors: list[BaseException]):
    """A task that raises the given errors in turn, then returns its attempt count."""
    attempts: list[int] = []

    @stage_task(retry_delay_seconds=0, cache_policy=None, persist_result=False)
    def flaky_task() -> int:
        attempts.append(1)
        if len(attempts) <= len(errors):
            raise errors[len(attempts) - 1]
        return len(attempts)

    @flow
    def run() -> int:
        return flaky_task()

    return run, attempts


@pytest.mark.parametrize("error", [
    OSError(errno.EIO, "Input/output error"),
    TimeoutError("read timed out"),
    storage.StorageError(errno.ECONNRESET, "could not write s3://bucket/x: connection reset"),
])
def test_transient_errors_are_retried(prefect_harness, error):
    run, attempts = _flaky([error, error])
    assert run() == 3 and len(attempts) == 3


@pytest.mark.parametrize("error", [
    ConfigError("invalid configuration: masks.box_threshold"),
    ValueError("caption is empty"),
    FileNotFoundError(errno.ENOENT, "no such file", "/data/missing.jpg"),
])
def test_config_and_data_errors_fail_at_once(prefect_harness, error):
    run, attempts = _flaky([error])
    with pytest.raises(type(error)):
        run()
    assert len(attempts) == 1


def test_out_of_memory_retries_with_a_smaller_batch(prefect_harness):
    seen: list[int] = []

    @stage_task(retry_delay_seconds=0, cache_policy=None, persist_result=False)
    def batched(batch_size: int) -> int:
        size = retry_batch_size(batch_size)
        seen.append(size)
        if size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return size

    @flow
    def run() -> int:
        return batched(8)

    assert run() == 2 and seen == [8, 4, 2]


def test_stage_fingerprint_follows_the_dag():
    base = load_config("tiny")
    changed = load_config("tiny", ["masks.box_threshold=0.4", "sample.batch_size=1"])
    same = [s for s in ("nouns", "masks", "train", "sample", "score")
            if stage_fingerprint(base, s) == stage_fingerprint(changed, s)]
    assert same == ["nouns"]  # masks changed, and everything downstream with it
    assert stage_fingerprint(base, "sample") == stage_fingerprint(load_config("tiny", ["sample.batch_size=1"]), "sample")
    with pytest.raises(ValueError, match="unknown stage"):
        stage_fingerprint(base, "report")


def test_error_classification():
    assert is_transient(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_transient(ConnectionResetError())
    assert not is_transient(PermissionError(errno.EACCES, "denied"))
    assert not is_transient(KeyError("image_id"))
    assert not is_transient(RuntimeError("shape mismatch"))


# ---------------------------------------------------------------------------
# Runner and result storage chosen by the profile
# ---------------------------------------------------------------------------


def _storage_root(slug: str) -> str:
    return ResultFiles.load(slug.split("/", 1)[1]).basepath


def test_runner_and_storage_follow_the_profile(prefect_harness, tmp_path):
    config = load_config("tiny", [f"storage.root={tmp_path}"])
    assert isinstance(task_runner(config), ThreadPoolTaskRunner)
    assert _storage_root(result_storage(config)) == str(tmp_path / "_prefect" / "results")

    remote = load_config("tiny", ["orchestration.result_storage=memory://bucket/results"])
    assert _storage_root(result_storage(remote)) == "memory://bucket/results"

    dask = load_config("tiny", ["orchestration.task_runner=dask", "orchestration.dask_address=tcp://10.0.0.5:8786"])
    runner = task_runner(dask)
    assert type(runner).__name__ == "DaskTaskRunner" and runner.address == "tcp://10.0.0.5:8786"
    flow_ = configured(TOY_STAGES["masks"], dask)
    assert flow_.task_runner.address == "tcp://10.0.0.5:8786"
    assert _storage_root(flow_.result_storage) == str(Path("runs/tiny/_prefect/results").resolve())


def test_local_dask_workers_keep_the_default_malloc_trimming_and_report_to_our_api(prefect_harness):
    import dask
    from prefect.settings import get_current_settings

    runner = task_runner(load_config("tiny", ["orchestration.task_runner=dask", "orchestration.dask_workers=2"]))
    assert runner.cluster_kwargs["n_workers"] == 2 and runner.cluster_kwargs["threads_per_worker"] == 1
    # The harness's API exists only in this process's settings; the workers are told.
    assert runner.cluster_kwargs["env"]["PREFECT_API_URL"] == get_current_settings().api.url.rstrip("/")
    # Dask's 64 KiB MALLOC_TRIM_THRESHOLD_ made torch CPU steps 1.6x slower; None unsets it.
    environ = dask.config.get("distributed.nanny.pre-spawn-environ")
    assert environ["MALLOC_TRIM_THRESHOLD_"] is None and str(environ["OMP_NUM_THREADS"]) == "1"


def test_local_cluster_has_one_worker_per_gpu_each_seeing_only_its_own(prefect_harness, monkeypatch):
    import importlib.util
    import sys
    import types

    import dask
    from prefect.settings import get_current_settings

    gpus = ["orchestration.task_runner=dask", "orchestration.gpus=2"]
    workers = task_runner(load_config("tiny", gpus)).cluster_kwargs["workers"]
    assert [spec["options"]["env"]["CUDA_VISIBLE_DEVICES"] for spec in workers.values()] == ["0", "1"]
    assert task_runner(load_config("tiny", [*gpus[:1], "orchestration.gpus=0"])).cluster_kwargs["n_workers"] == 2
    # With dask-cuda installed (a stand-in here: it needs CUDA), its LocalCUDACluster does the pinning.
    stand_in = types.ModuleType("dask_cuda")
    stand_in.LocalCUDACluster = object
    monkeypatch.setitem(sys.modules, "dask_cuda", stand_in)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: object() if name == "dask_cuda" else find_spec(name, *args))
    runner = task_runner(load_config("tiny", gpus))
    assert runner.cluster_class == "dask_cuda.LocalCUDACluster"
    assert runner.cluster_kwargs["CUDA_VISIBLE_DEVICES"] == [0, 1]
    # It overwrites each worker's env: the API URL reaches the workers through Dask's config.
    assert dask.config.get("distributed.nanny.environ.PREFECT_API_URL") == get_current_settings().api.url.rstrip("/")


# ---------------------------------------------------------------------------
# The real five stages, demo-sized: tiny models, three photos, a few steps.
# ---------------------------------------------------------------------------




def test_a_tasks_library_key_does_not_depend_on_what_the_process_imported_before() -> None:
    """Two Dask workers that ran different tasks before must key the same task alike: the
    library modules counted come from the source's imports, not from this process's modules.
    A fresh process that imported only the task's module agrees with this one, which has
    imported every stage (the score and demo tasks among them)."""
    import importlib
    import subprocess
    import sys
    from pathlib import Path

    from tasks.common import _library_digest

    for unrelated in ("tasks.demo", "tasks.score"):  # stages the sample task does not use, now in this process
        importlib.import_module(unrelated)

    code = "import tasks.sample\nfrom tasks.common import _library_digest\nprint(_library_digest('tasks.sample'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=300, check=True)
    _library_digest.cache_clear()
    assert done.stdout.strip().splitlines()[-1] == _library_digest("tasks.sample")
