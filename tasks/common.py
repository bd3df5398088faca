"""Shared task policy: what is cached, what is retried, where tasks run.

Every stage task is decorated with :func:`stage_task`, so caching and retries are
decided in one place. Tasks take URIs, content digests, their own typed config
sections and a ``fingerprint`` argument
(:func:`tokencompose_core.stages.stage_fingerprint`: the models plus the result
settings of the stage and of every stage upstream of it). The cache key is the
fingerprint, the URIs and digests, and the code; never a downstream section.

Where tasks run and where their results persist are chosen by the profile's
``orchestration`` section: :func:`configured` applies both to a flow.
"""

from __future__ import annotations

import ast
import errno
import importlib
import importlib.util
import inspect
import json
import sys
import threading
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable
from uuid import UUID

from prefect import Flow, Task, task
from prefect.cache_policies import NO_CACHE, TASK_SOURCE, CachePolicy, Inputs
from prefect.context import TaskRunContext
from prefect.filesystems import WritableFileSystem
from prefect.serializers import Serializer
from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, Field

from tokencompose_core.config import PipelineConfig
from tokencompose_core.identity import bytes_hash, value_hash
from tokencompose_core.stages import STAGES
from tokencompose_core.storage import atomic_write_bytes, exists, filesystem, join, read_bytes

# ---------------------------------------------------------------------------
# Retries: transient failures only, with backoff.
# ---------------------------------------------------------------------------

# Errors a second try can fix: I/O on network storage, timeouts, a busy GPU.
_TRANSIENT_ERRNOS = {
    errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
    errno.ECONNABORTED, errno.EPIPE, errno.EIO, errno.ENETUNREACH, errno.EHOSTUNREACH,
    errno.ESTALE,
}
# Errors that will fail the same way again: bad configuration (ConfigError is a
# ValueError) or bad data.
_PERMANENT = (ValueError, TypeError, LookupError, FileNotFoundError, PermissionError,
              IsADirectoryError, NotADirectoryError, NotImplementedError)

# task run id -> how many times it ran out of GPU memory (read by retry_batch_size).
_OOM_FAILURES: dict[UUID, int] = {}


def is_out_of_memory(error: BaseException) -> bool:
    """torch's (CUDA) OutOfMemoryError, without importing torch."""
    return any(cls.__name__ == "OutOfMemoryError" and cls.__module__.startswith("torch")
               for cls in type(error).__mro__)


def is_transient(error: BaseException) -> bool:
    """True for failures worth retrying; configuration and data errors are not."""
    if is_out_of_memory(error):
        return True
    if isinstance(error, _PERMANENT):
        return False
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    if isinstance(error, OSError):
        return error.errno in _TRANSIENT_ERRNOS or error.errno is None
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient failures.

    A CUDA out-of-memory failure also halves the batch of the next attempt (see
    :func:`retry_batch_size`) and releases the cached GPU blocks first.
    """
    try:
        state.result()
    except BaseException as error:  # noqa: BLE001 - we classify, not swallow
        if is_out_of_memory(error):
            _OOM_FAILURES[task_run.id] = _OOM_FAILURES.get(task_run.id, 0) + 1
            _empty_cuda_cache()
        return is_transient(error)
    return False


def retry_batch_size(batch_size: int) -> int:
    """The batch size for this attempt: halved after each out-of-memory failure.

    Call it inside a stage task on the configured batch size. The cache key still
    holds the configured value, which is right: results are per item and do not
    depend on how items were batched.
    """
    context = TaskRunContext.get()
    halvings = _OOM_FAILURES.get(context.task_run.id, 0) if context and context.task_run else 0
    return max(1, batch_size >> halvings)


def _empty_cuda_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# Caching: the stage fingerprint, the input URIs and digests, and the code.
# ---------------------------------------------------------------------------

_LIBRARY = "tokencompose_core"


@dataclass
class LibrarySource(CachePolicy):
    """Cache key part: the source of the ``tokencompose_core`` modules a task uses.

    ``TASK_SOURCE`` sees only the thin task body; the work happens in the library,
    so a change there must invalidate the cache too. The modules are those the
    task's module imports, followed transitively.
    """

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any] | None,
                    flow_parameters: dict[str, Any] | None, **kwargs: Any) -> str | None:
        if not task_ctx:
            return None
        # One thread at a time: tasks submitted together key at once, and CPython 3.11's
        # ast.parse fails in concurrent threads ("AST constructor recursion depth mismatch").
        with _LIBRARY_LOCK:
            return _library_digest(task_ctx.task.fn.__module__)


_LIBRARY_LOCK = threading.Lock()


@lru_cache(maxsize=None)
def _library_digest(module_name: str) -> str:
    return value_hash({name: bytes_hash(Path(_source(name)).read_bytes(), None)
                       for name in _library_modules(module_name)}, None)


def _library_modules(module_name: str) -> set[str]:
    """The library modules ``module_name`` imports, followed transitively, as their source
    says (lazy imports included): what this process happened to import before must not
    change a cache key, or two workers would key the same task apart."""
    seen: set[str] = set()
    pending = [module_name]
    while pending:
        for name in _imported_modules(pending.pop()):
            if name.split(".")[0] == _LIBRARY and name not in seen:
                seen.add(name)
                pending.append(name)
    return seen


def _imported_modules(module_name: str) -> set[str]:
    """Modules named by the import statements of ``module_name`` (and their parent packages)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(Path(_source(module_name)).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names
                      if _is_module(f"{node.module}.{alias.name}")}
    return {".".join(name.split(".")[:end]) for name in names for end in range(1, name.count(".") + 2)}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a name inside a plain module, not a submodule
        return False


def _source(module_name: str) -> str:
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.origin:
        raise ImportError(f"no source for module {module_name}")
    return spec.origin


def _section_parameters(fn: Callable) -> list[str]:
    """Parameters typed as a config section. The ``fingerprint`` argument already holds
    what in them changes results, so they stay out of the key: their execution-only
    fields (batch sizes, devices) must not change it."""
    hints = typing.get_type_hints(fn)
    return [name for name, hint in hints.items()
            if name != "return" and isinstance(hint, type) and issubclass(hint, BaseModel)]


def stage_cache_policy(fn: Callable) -> CachePolicy:
    """Key = the task's plain inputs (URIs, content digests, ``fingerprint``) + its code."""
    if "fingerprint" not in inspect.signature(fn).parameters:
        raise TypeError(f"stage task {fn.__qualname__} needs a `fingerprint` parameter (its stage fingerprint)")
    return Inputs(exclude=_section_parameters(fn)) + TASK_SOURCE + LibrarySource()


def stage_task(fn: Callable | None = None, **options: Any):
    """``@task`` with the project's cache policy and retry rules.

    Retries: two, after ~2 s then ~4 s (jittered so shards do not retry in lock
    step), and only for transient errors (:func:`is_transient`); anything else
    fails at once with its own message.
    """
    def decorate(function: Callable):
        defaults: dict[str, Any] = dict(
            persist_result=True,
            result_serializer=DataOnlyJSON(),
            retries=2,
            retry_delay_seconds=exponential_backoff(backoff_factor=2),
            retry_jitter_factor=0.5,
            retry_condition_fn=retry_transient,
        )
        if "cache_policy" not in options:
            defaults["cache_policy"] = stage_cache_policy(function)
        return task(function, **(defaults | options))

    return decorate if fn is None else decorate(fn)


# Names end with this mark: tests and readers of the run history tell them from stage tasks.
BOOKKEEPING = "(bookkeeping)"


def bookkeeping_task(fn: Callable) -> Task:
    """A library step that reads the disk as it is now (plan a stage: its inputs' identities,
    its output folder, which parts are done; seal an output folder) as a task: retried like a
    stage task, visible in the run, never cached (a cache record cannot know what the disk
    holds now). What it costs, hashing files, is memoised per file version
    (:func:`tokencompose_core.identity.file_digest`)."""
    return task(fn, name=f"{fn.__name__} {BOOKKEEPING}", cache_policy=NO_CACHE, persist_result=False, retries=2,
                retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
                retry_condition_fn=retry_transient)


# Names end with this mark: a task that only calls stage flows (their tasks are the cached ones).
COMPOSES = "(composes)"


def composing_task(fn: Callable) -> Task:
    """A task that runs stage flows (one run of a recipe, e.g. the demo's): so it can run on a
    task runner's worker beside others. Never cached; retries are left to the stages' tasks."""
    return task(fn, name=f"{fn.__name__} {COMPOSES}", cache_policy=NO_CACHE, persist_result=False)


def recompute_unless(stage_task_: Task, whole: bool) -> Task:
    """``stage_task_``, forced to run instead of read from the cache unless the output it
    fills is whole (:func:`tokencompose_core.outputs.is_whole`): a cache record alone
    never stands for an output that was deleted or damaged since."""
    return stage_task_ if whole else stage_task_.with_options(refresh_cache=True)


# ---------------------------------------------------------------------------
# Where tasks run and where results persist: chosen by the profile.
# ---------------------------------------------------------------------------


def task_runner(config: PipelineConfig) -> TaskRunner:
    """The profile's task runner: Prefect's thread pool, or Dask via prefect-dask.

    With ``dask_address`` the flow connects to that existing cluster (each of its workers
    should own one GPU); without, it starts a local cluster for its own duration: one
    worker per GPU (:func:`gpu_cluster`), or ``dask_workers`` CPU workers.
    """
    settings = config.orchestration
    if settings.task_runner == "default":
        return ThreadPoolTaskRunner(max_workers=settings.max_workers)
    import dask
    from prefect_dask import DaskTaskRunner

    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    # Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, so glibc hands every freed
    # block over 64 KiB back to the OS; torch frees and re-allocates such blocks all the
    # time, and a CPU training step ran 1.6x slower (half of it system time). Keep
    # glibc's adaptive default for the workers this flow starts.
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    from tokencompose_core.devices import gpu_count  # torch: only where a Dask cluster starts

    gpus = gpu_count() if settings.gpus is None else settings.gpus
    if gpus:
        return gpu_cluster(gpus, settings.dask_threads_per_worker, _worker_api_env())
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": settings.dask_workers,
        "threads_per_worker": settings.dask_threads_per_worker,
        "processes": True,
        "dashboard_address": None,
        "env": _worker_api_env(),
    })


def gpu_cluster(gpus: int, threads: int, env: dict[str, str]) -> TaskRunner:
    """A local cluster of one worker per GPU, worker i seeing only GPU i
    (``CUDA_VISIBLE_DEVICES=i`` set before CUDA starts in it): every stage's ``auto``
    device (:func:`tokencompose_core.devices.resolve_device`) is then that worker's own GPU.

    dask-cuda's ``LocalCUDACluster`` when it is installed (worker i sees GPU i first, then
    the others, and is pinned to the CPU cores near its GPU); else a ``SpecCluster`` of
    one ``Nanny`` spec per GPU, which does the same pinning with plain distributed.
    """
    import dask
    from prefect_dask import DaskTaskRunner

    if importlib.util.find_spec("dask_cuda") is not None:
        # LocalCUDACluster replaces each worker's ``env`` with its CUDA_VISIBLE_DEVICES:
        # the rest goes through Dask's config, which every Nanny of this process reads.
        dask.config.set({f"distributed.nanny.environ.{name}": value for name, value in env.items()})
        return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster", cluster_kwargs={
            "CUDA_VISIBLE_DEVICES": list(range(gpus)), "threads_per_worker": threads, "dashboard_address": None})
    local = {"host": "127.0.0.1", "protocol": "tcp://"}
    # Each worker may use its share of the machine's memory, as LocalCluster's workers do.
    workers = {f"gpu-{index}": {"cls": "distributed.Nanny", "options": {
                   **local, "nthreads": threads, "memory_limit": 1 / gpus,
                   "env": {**env, "CUDA_VISIBLE_DEVICES": str(index)}}}
               for index in range(gpus)}
    return DaskTaskRunner(cluster_class="distributed.SpecCluster", cluster_kwargs={
        "scheduler": {"cls": "distributed.Scheduler", "options": {**local, "dashboard_address": None}},
        "workers": workers})


def _worker_api_env() -> dict[str, str]:
    """Point local Dask workers at this process's Prefect API.

    Worker processes do not see an API URL set only in this process's settings (a
    test harness, or Prefect's temporary server when none is configured): each would
    start a temporary server of its own, and the task runs it executes would be
    recorded there and vanish with it.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {"PREFECT_API_URL": str(client.api_url).rstrip("/")}


def result_storage_uri(config: PipelineConfig) -> str:
    """Where task results and cache records live: the profile's URL or under the root."""
    return config.orchestration.result_storage or join(config.storage.root, "_prefect", "results")


class DataOnlyJSON(Serializer):
    """Task and flow results as plain JSON: reading one can only build dicts, lists,
    strings and numbers. Prefect's pickle (and its JSON with ``__class__`` hooks)
    would run code planted in a cache record by anyone who can write the storage."""

    type: str = Field(default="tokencompose-json", frozen=True)

    def dumps(self, obj: Any) -> bytes:
        if isinstance(obj, BaseException):
            # A failed run's record: its one-line message as data (Prefect reads a string
            # result of a failed state as that message), never the exception object.
            obj = f"{type(obj).__name__}: {obj}"
        return json.dumps(obj, sort_keys=True).encode("utf-8")

    def loads(self, blob: bytes) -> Any:
        return json.loads(blob)


def _checked_record(content: bytes, path: str) -> bytes:
    """``content`` if it is JSON and, when it is a result record, one that names
    :class:`DataOnlyJSON` as its serializer; else an error, and Prefect then treats the
    cache record as missing, recomputes the task and overwrites the record.

    A record whose serializer is missing is refused too: Prefect reads a missing field
    as its pickle serializer. A bare JSON value (a flow's result) is no record: Prefect
    reads it only with the serializer its API recorded for that run."""
    try:
        data = json.loads(content)
    except ValueError:
        raise ValueError(f"refusing cached result {path}: not JSON") from None
    if isinstance(data, dict) and "metadata" in data:
        metadata = data["metadata"]
        serializer = metadata.get("serializer") if isinstance(metadata, dict) else None
        kind = serializer.get("type") if isinstance(serializer, dict) else None
        if kind != DataOnlyJSON().type:
            raise ValueError(f"refusing cached result {path}: serializer {kind!r} is not allowed "
                             f"(only {DataOnlyJSON().type!r})")
    return content


class ResultFiles(WritableFileSystem):
    """Prefect result storage on any fsspec URL that hands back only data-only JSON records."""

    _block_type_name = "TokenCompose Result Files"
    basepath: str

    def _resolve_path(self, path: str) -> str:
        """The full URI of ``path``: a key under the base path, or a URI already under it.

        Prefect calls this to turn keys into storage keys where it has no saved block
        id to go by (task runs on Dask workers), then hands those back to read or write.
        """
        base = self.basepath.rstrip("/")
        if not path:
            return base
        return path if path.startswith(base + "/") else join(base, path)

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path, _sync=True)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        uri = self._resolve_path(path)
        if not exists(uri):
            raise ValueError(f"no result at {uri}")
        return _checked_record(read_bytes(uri), uri)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content, _sync=True)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        uri = self._resolve_path(path)
        atomic_write_bytes(uri, content)
        return uri


def result_storage(config: PipelineConfig) -> str:
    """Prefect result storage for :func:`result_storage_uri`: the slug of a saved
    :class:`ResultFiles` block (Prefect takes storage only as a saved block; Dask
    workers and deployment runs load it by name). A local folder is made absolute
    so that runs started in other folders agree."""
    uri = result_storage_uri(config)
    fs, path = filesystem(uri)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    basepath = str(Path(path).resolve()) if protocol in ("file", "local") else uri
    name = f"tokencompose-results-{bytes_hash(basepath.encode(), 12)}"
    ResultFiles(basepath=basepath).save(name, overwrite=True)
    return f"{ResultFiles.get_block_type_slug()}/{name}"


def configured(flow: Flow, config: PipelineConfig) -> Flow:
    """``flow`` with the profile's task runner and result storage.

    Call the result as a subflow: ``configured(masks_flow, config)(profile, overrides)``.
    Its tasks then run on that runner and persist (and find cached) results there.
    """
    return flow.with_options(
        task_runner=task_runner(config),
        result_storage=result_storage(config),
        result_serializer=DataOnlyJSON(),
        persist_result=True,
    )


# ---------------------------------------------------------------------------
# The generic steps of every stage flow (see flows/stage.py).
# ---------------------------------------------------------------------------


def plan(stage: str, config: PipelineConfig, input_uri: str | None) -> Any:
    """The stage's plan: its inputs' identities, its output folder, its units and which are done."""
    return STAGES[stage].module.plan(config, input_uri)


def seal(stage: str, config: PipelineConfig, stage_plan: Any, results: Any) -> None:
    """Write the stage record of every folder the stage filled (after its units)."""
    STAGES[stage].module.seal(config, stage_plan, results)


plan_stage = bookkeeping_task(plan)
seal_stage = bookkeeping_task(seal)
