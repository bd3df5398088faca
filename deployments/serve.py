"""Serve the deployments of ``deployments/prefect.yaml`` from this process.

``prefect deploy`` + a worker is the production route (docs/DEPLOY.md); this is
the one-command alternative for a single machine: the same deployments (read
from the same file, so the two never drift apart), schedules included, run as
subprocesses of this one. Needs a Prefect server (``PREFECT_API_URL``).

    python -m deployments.serve                    # profiles as in prefect.yaml
    python -m deployments.serve --profile sd21     # every non-smoke deployment on sd21
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.flows import load_flow_from_entrypoint

from tokencompose_core.config import load_config

PREFECT_YAML = Path(__file__).resolve().with_name("prefect.yaml")
REPO_ROOT = PREFECT_YAML.parents[1]
SMOKE_TAG = "smoke"
ROOTS_OVERRIDE = "storage.allowed_roots="


def deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The ``deployments`` entries of a prefect.yaml."""
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)["deployments"]


def roots_override(profile: str) -> str:
    """The override confining a deployment's runs to ``profile``'s storage roots (``storage.root``
    and its ``allowed_roots``): URIs sent through the API or UI cannot read other files."""
    config = load_config(profile).storage
    return ROOTS_OVERRIDE + json.dumps([config.root, *config.allowed_roots])


def build_deployments(profile: str | None = None, path: Path = PREFECT_YAML) -> list[RunnerDeployment]:
    """RunnerDeployments for every entry; ``profile`` replaces the profile of non-smoke ones.

    Each gets its profile's storage roots (:func:`roots_override`) unless its entry sets
    ``storage.allowed_roots`` itself for the profile it keeps.
    """
    deployments = []
    for spec in deployment_specs(path):
        parameters = dict(spec.get("parameters") or {})
        overrides = list(parameters.get("overrides") or [])
        if profile and SMOKE_TAG not in spec.get("tags", []):
            parameters["profile"] = profile
            overrides = [o for o in overrides if not o.startswith(ROOTS_OVERRIDE)]  # the old profile's roots
        if not any(o.startswith(ROOTS_OVERRIDE) for o in overrides):
            overrides.insert(0, roots_override(parameters.get("profile", "tiny")))
        parameters["overrides"] = overrides
        flow = load_flow_from_entrypoint(str(REPO_ROOT / spec["entrypoint"]))
        deployments.append(flow.to_deployment(
            name=spec["name"],
            description=spec.get("description"),
            parameters=parameters,
            tags=spec.get("tags"),
            cron=_cron(spec),
        ))
    return deployments


def _cron(spec: dict[str, Any]) -> str | None:
    schedules = [s for s in spec.get("schedules") or [] if s.get("active", True)]
    if len(schedules) > 1 or (schedules and "cron" not in schedules[0]):
        raise ValueError(f"deployment {spec['name']!r}: serve supports one cron schedule, got {schedules}")
    return schedules[0]["cron"] if schedules else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None, help="profile for every non-smoke deployment")
    args = parser.parse_args(argv)
    serve(*build_deployments(args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
