"""The ``tokencompose`` command: one subcommand per stage, plus ``run`` and ``demo``.

Each subcommand calls the stage's Prefect flow in-process. With no
``PREFECT_API_URL`` set, Prefect runs the flow against a temporary local
backend, so nothing needs a server; with one set, runs show up in its UI.

    tokencompose train -p tiny train.max_steps=50 train.learning_rate=1e-4
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from tokencompose_core.stages import STAGES

# Verbs beyond the five stages: the whole DAG, and the embedded demo.
RUN = ("flows.pipeline:pipeline_flow", "the whole DAG: nouns -> masks -> train -> sample -> score")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokencompose",
        description="TokenCompose pipeline: token-level grounding for text-to-image diffusion.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    verbs = {name: stage.help for name, stage in STAGES.items()} | {"run": RUN[1]}
    for name, help_text in verbs.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("-p", "--profile", default="tiny", help="profile name in configs/ or a YAML path")
        sub.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
        sub.add_argument("--input", dest="input_uri", default=None,
                         help="upstream URI to read (default: the previous stage's output under storage.root)")
    demo = commands.add_parser("demo", help="the embedded synthetic-world experiment (no weights, no network)")
    demo.add_argument("--quick", action="store_true", help="a <=3 minute smoke version")
    demo.add_argument("--out", default=None, help="output folder (default runs/demo or runs/demo-quick)")
    return parser


def _load_flow(target: str) -> Any:
    module, function = target.split(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as error:
        raise SystemExit(f"tokencompose: {module}.{function} is not available in this build ({error})")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        flow = _load_flow("flows.demo:demo_flow")
        result = flow(quick=args.quick, out=args.out)
    else:
        from tokencompose_core.config import ConfigError, load_config

        try:
            config = load_config(args.profile, args.overrides)  # fail fast, before Prefect starts
        except ConfigError as error:
            print(f"tokencompose: {error}", file=sys.stderr)
            return 2
        from tasks.common import configured

        target = RUN[0] if args.command == "run" else STAGES[args.command].flow
        # The profile picks the task runner (default or Dask) and the result storage.
        flow = configured(_load_flow(target), config)
        kwargs: dict[str, Any] = {"profile": args.profile, "overrides": list(args.overrides)}
        if args.input_uri:
            kwargs["input_uri"] = args.input_uri
        result = flow(**kwargs)
    print(json.dumps(result, indent=2, default=str) if not isinstance(result, str) else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
