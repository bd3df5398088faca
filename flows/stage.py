"""The one path every stage flow takes: load config -> plan -> submit units -> seal -> summary.

Each step is a task (the plan and the seal are bookkeeping tasks: retried, never
cached, see :func:`tasks.common.bookkeeping_task`; the units are the stage's cached
tasks in ``tasks/<stage>.py``), so the flow process itself only composes.
"""

from __future__ import annotations

import importlib
from typing import Any

from tasks.common import plan_stage, seal_stage
from tokencompose_core.config import load_config
from tokencompose_core.stages import STAGES


def run_stage(stage: str, profile: str, overrides: list[str] | None, input_uri: str | None) -> dict[str, Any]:
    """Run ``stage`` of ``profile`` (with ``overrides``) on ``input_uri``; its summary."""
    config = load_config(profile, overrides)
    plan = plan_stage(stage, config, input_uri)
    results = importlib.import_module(f"tasks.{stage}").run_units(config, plan)
    seal_stage(stage, config, plan, results)
    summary = STAGES[stage].module.summary(plan, results)
    print(f"{stage}: {summary}")
    return summary
