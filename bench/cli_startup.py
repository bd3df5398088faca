"""Start-up of the `tokencompose` command: the shared local Prefect server against a temporary one per command.

    python bench/cli_startup.py [--rounds 3] [--busy 2] [--out startup.json]

Each round uses a fresh PREFECT_HOME, as on a new machine, and measures in fresh processes:

- ``orchestration_first_s`` / ``orchestration_again_s``: from process start to the first line of
  a trivial flow's body when run the way the CLI runs flows (``flows.cli._prefect_api``): Prefect's
  import, finding or starting the local server, creating the flow run. First on the fresh home
  (the server starts and migrates its database), then again (the server is reused).
- ``orchestration_temporary_s``: the same probe the way Prefect runs a flow with no API configured
  (a temporary server of its own, started for this process), on the same home: the baseline;
  ``orchestration_temporary_first_s`` the same on another fresh home.
- ``nouns_first_s`` / ``nouns_again_s``: wall time of a whole `tokencompose nouns` on a 2-image
  manifest, first command on a fresh home, then the same command again (all cache hits).

``--busy N`` keeps N CPU-bound processes running beside the measurements, as on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402

BAD = ROOT / "tests" / "data" / "bad"

# Process start -> first line of a flow body. PROBE_START is the parent's clock at spawn.
PROBE = """
import os, time, contextlib
from flows import cli
from prefect import flow

@flow
def probe():
    return time.time()

api = cli._prefect_api() if os.environ["PROBE_MODE"] == "shared" else contextlib.nullcontext()
with api:
    print(probe() - float(os.environ["PROBE_START"]))
"""


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_LOGGING_LEVEL")}
    return env | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                  "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"} | extra


def probe(home: Path, mode: str) -> float:
    env = _env(home, PROBE_MODE=mode, PROBE_START=repr(time.time()))
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True, timeout=900)
    return float(done.stdout.strip().splitlines()[-1])


def command(home: Path, *argv: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=ROOT, env=_env(home), capture_output=True,
                   check=True, timeout=900)
    return time.perf_counter() - start


def manifest(folder: Path) -> str:
    rows = [json.loads(line) for line in BAD.joinpath("manifest.jsonl").read_text().splitlines()[:2]]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(row | {"image": str(BAD / row["image"])}) + "\n" for row in rows))
    return str(path)


def one_round(folder: Path) -> dict[str, float]:
    home, root = folder / "prefect", f"storage.root={folder / 'root'}"
    nouns = ["nouns", root, "--input", manifest(folder)]
    try:
        result = {"orchestration_first_s": probe(home, "shared"), "orchestration_again_s": probe(home, "shared"),
                  "orchestration_temporary_s": probe(home, "temporary"),
                  "orchestration_temporary_first_s": probe(folder / "prefect-3", "temporary")}
        command(home, "server", "stop")
        fresh = folder / "prefect-2"
        result["nouns_first_s"] = command(fresh, *nouns)
        result["nouns_again_s"] = command(fresh, *nouns)
        command(fresh, "server", "stop")
        return result
    finally:
        for name in ("prefect", "prefect-2"):
            command(folder / name, "server", "stop")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, help="CPU-bound processes running beside")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        rounds = []
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="tokencompose-startup-") as folder:
                rounds.append(one_round(Path(folder)))
    finally:
        for process in busy:
            process.kill()
    result = {"cpus": os.cpu_count(), "busy_processes": args.busy, "rounds": rounds,
              "median": {key: round(statistics.median(r[key] for r in rounds), 2) for key in rounds[0]}}
    median = result["median"]
    result["again_vs_temporary"] = round(median["orchestration_again_s"] / median["orchestration_temporary_s"], 3)
    return emit(result, args.out)


if __name__ == "__main__":
    main()
