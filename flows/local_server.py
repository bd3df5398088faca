"""The local Prefect server the ``tokencompose`` command starts once and then reuses.

Without an API URL, Prefect starts a temporary server for every process and gives
up after 20 s; on a fresh ``PREFECT_HOME`` its database migrations alone can take
longer on a busy 2-core machine, and every later command pays for the start again.
So the CLI keeps one server per ``PREFECT_HOME`` instead, started with Prefect's own
``prefect server start`` (API and UI, no background services: those schedule
deployments, which run against a server of their own, docs/DEPLOY.md), detached
from the command that started it, and recorded in ``$PREFECT_HOME/tokencompose-server.json``.
A killed command therefore leaves nothing behind but this one documented server:
``tokencompose server stop`` (or killing the recorded process) ends it.

An API URL the user configured (``PREFECT_API_URL`` in the environment or the
active Prefect profile) always wins: then no server is started.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Iterator

from tokencompose_core.network import free_port

RECORD = "tokencompose-server.json"
LOG = "tokencompose-server.log"
_LOCK = "tokencompose-server.lock"
# The first start on a fresh PREFECT_HOME runs every database migration: 7 s on a quiet
# 2-core machine, 30 s and more with other work on the cores. Later starts take ~3 s.
START_TIMEOUT_S = float(os.environ.get("TOKENCOMPOSE_SERVER_START_TIMEOUT", "300"))


class ServerStartError(RuntimeError):
    """The local server did not come up; the message says what to do."""


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def configured_api_url() -> str | None:
    """The API URL the user configured (environment, profile, settings files), if any."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def ensure_server() -> str:
    """The API URL of this ``PREFECT_HOME``'s local server, started first if none answers.

    Concurrent commands agree on one server: the check and the start happen under a file lock.
    """
    url = _running_url()
    if url:
        return url
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home / _LOCK):
        url = _running_url()
        if url:
            return url
        stop()  # a record of a server that no longer answers, or of another Prefect version's
        return _start(home)


def status() -> dict | None:
    """The running server's record (pid, url, versions), or None when none answers."""
    record = _read_record()
    return record if record and _running_url() else None


def stop() -> bool:
    """Stop the recorded server (and forget it). True if a process was stopped."""
    record = _read_record()
    if record is None:
        return False
    stopped = _is_our_server(record["pid"]) and _terminate_group(record["pid"])
    (prefect_home() / RECORD).unlink(missing_ok=True)
    return stopped


def _running_url() -> str | None:
    record = _read_record()
    if not record or record.get("prefect") != version("prefect"):  # another Prefect's API may differ
        return None
    return record["url"] if _is_our_server(record["pid"]) and _healthy(record["url"]) else None


def _read_record() -> dict | None:
    """The recorded server; None when there is none or the record is damaged (then it is stale)."""
    path = prefect_home() / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    valid = (isinstance(record, dict) and isinstance(record.get("pid"), int) and record["pid"] > 0
             and isinstance(record.get("url"), str))
    return record if valid else None


def _start(home: Path) -> str:
    print("tokencompose: starting the local Prefect server (once per PREFECT_HOME; the first start "
          "sets up its database); later commands reuse it, `tokencompose server stop` ends it",
          file=sys.stderr, flush=True)
    started = time.monotonic()
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED=env.get(
        "PREFECT_SERVER_ANALYTICS_ENABLED", "false"))
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
               "--no-services"]
    with open(home / LOG, "ab") as log:
        # A session of its own: neither Ctrl-C nor a kill of this command reaches it.
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
    while time.monotonic() - started < START_TIMEOUT_S:
        if process.poll() is not None:
            raise ServerStartError(f"the local Prefect server exited with status {process.returncode} while "
                                   f"starting; its log is {home / LOG}")
        if _healthy(url):
            _write_record(home, {"pid": process.pid, "url": url, "ui": url.removesuffix("/api"),
                                 "prefect": version("prefect"),
                                 "python": sys.executable, "started": time.time()})
            return url
        time.sleep(0.2)
    _terminate_group(process.pid)
    raise ServerStartError(
        f"the local Prefect server did not answer within {START_TIMEOUT_S:.0f} s (log: {home / LOG}); "
        "try again when the machine is less busy, raise TOKENCOMPOSE_SERVER_START_TIMEOUT, "
        "or set PREFECT_API_URL to a running Prefect server")


def _write_record(home: Path, record: dict) -> None:
    temporary = home / f".{RECORD}.{os.getpid()}"
    temporary.write_text(json.dumps(record, indent=2))
    os.replace(temporary, home / RECORD)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _is_our_server(pid: int) -> bool:
    """``pid`` is alive and (where /proc shows it) a Prefect server, not a recycled pid."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():
        return True
    arguments = cmdline.read_bytes().split(b"\0")
    return b"prefect" in arguments and b"server" in arguments


def _terminate_group(pid: int, grace_s: float = 10.0) -> bool:
    """SIGTERM the server's process group, SIGKILL after ``grace_s``; True once it is gone."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(0.1)
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)  # our own child: reap it
        if reaped:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.exists() and state.read_text().split(") ")[-1].startswith("Z"))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
