"""Shared task policy: what is cached, what is retried.

Every stage task is decorated with :func:`stage_task`, so caching and retries are
decided in one place. Tasks take URIs and small values, never big objects, and a
``fingerprint`` argument (models + the stage's config) so the cache key changes
whenever a model or a parameter that matters changes.
"""

from __future__ import annotations

import errno
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

# Errors a second try can fix: I/O on network storage, timeouts, a busy GPU.
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.EIO}


def is_transient(error: BaseException) -> bool:
    """True for failures worth retrying; configuration and data errors are not."""
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    if type(error).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return True
    if isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, PermissionError)):
        return error.errno in _TRANSIENT_ERRNOS or error.errno is None
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient failures."""
    try:
        state.result()
    except BaseException as error:  # noqa: BLE001 - we classify, not swallow
        return is_transient(error)
    return False


def stage_task(fn: Callable | None = None, **options: Any):
    """``@task`` with the project's cache policy and retry rules."""
    defaults: dict[str, Any] = dict(
        cache_policy=INPUTS + TASK_SOURCE,
        persist_result=True,
        retries=2,
        retry_delay_seconds=[2, 10],
        retry_condition_fn=retry_transient,
    )
    defaults.update(options)
    if fn is None:
        return lambda f: task(f, **defaults)
    return task(fn, **defaults)
