"""The ``tokencompose`` command: one subcommand per stage, plus ``run``, ``demo`` and ``fid-reference``.

Each subcommand calls the stage's Prefect flow in-process. With no Prefect API
configured, the flows report to one local Prefect server that the first command
starts and later ones reuse (:mod:`flows.local_server`; ``tokencompose server
stop`` ends it); with ``PREFECT_API_URL`` set, runs go to that server instead.

    tokencompose train -p tiny train.max_steps=50 train.learning_rate=1e-4

A user's error (a bad profile or override, an unreadable input, missing weights,
no whole checkpoint, a server that would not start) prints one line and exits with
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from flows import local_server
from tokencompose_core.stages import STAGES

if TYPE_CHECKING:
    from tokencompose_core.config import PipelineConfig

# Before anything imports Prefect, which reads its settings then: the local server the
# CLI starts (it inherits this environment) would otherwise send usage telemetry, and
# log an ERROR when offline.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Prefect's loggers that log a failed task or flow run with its traceback.
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")

# Verbs beyond the five stages: the whole DAG, and the embedded demo.
RUN = ("flows.pipeline:pipeline_flow", "the whole DAG: nouns -> masks -> train -> sample -> score")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokencompose",
        description="TokenCompose pipeline: token-level grounding for text-to-image diffusion.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    verbs = {name: stage.help for name, stage in STAGES.items()} | {"run": RUN[1]}
    for name, help_text in verbs.items():
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[common])
        sub.add_argument("-p", "--profile", default="tiny", help="profile name in configs/ or a YAML path")
        sub.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
        sub.add_argument("--input", dest="input_uri", default=None,
                         help="upstream URI to read (default: the previous stage's output under storage.root)")
    demo = commands.add_parser("demo", help="the embedded synthetic-world experiment (no weights, no network)",
                               parents=[common])
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a <=3 minute smoke version (the demo-quick profile)")
    size.add_argument("--profile", default=None,
                      help="another demo profile: demo-gpu (the GPU budget, <=10 min on one H100-class GPU)")
    demo.add_argument("--out", default=None, help="output folder (default: the profile's, runs/<profile>)")
    demo.add_argument("overrides", nargs="*", metavar="section.field=value",
                      help="overrides of the demo profile, e.g. demo.finetune_seeds=[1,2] train.token_loss_weight=0.3")
    _fid_reference_parser(commands, common)
    server = commands.add_parser("server", help="the local Prefect server the commands share (start, status, stop)",
                                 parents=[common])
    server.add_argument("action", choices=["start", "status", "stop"])
    return parser


def _fid_reference_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    help_text = ("write an FID reference manifest and its prompts: N random captions of COCO or Flickr30k "
                 "(docs/EVALUATION.md)")
    sub = commands.add_parser("fid-reference", help=help_text, description=help_text, parents=[common])
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--coco-captions", metavar="FILE", help="COCO's captions_val2017.json")
    source.add_argument("--flickr30k-captions", metavar="FILE",
                        help="Flickr30k's results_20130124.token or Karpathy's dataset_flickr30k.json")
    sub.add_argument("--images", required=True, metavar="DIR", help="the folder of the captions file's images")
    sub.add_argument("--out", required=True, metavar="DIR", help="where <name>.jsonl and <name>.txt are written")
    sub.add_argument("--count", type=int, default=None, help="captions drawn (default 10000, the paper's)")
    sub.add_argument("--seed", type=int, default=None, help="seed of the draw (default 0)")
    sub.add_argument("--split", default=None, help="dataset_flickr30k.json only: train, val or test (default all)")
    sub.add_argument("--name", default=None, help="file stem (default e.g. coco-val2017-10000)")


def _fid_reference(args: argparse.Namespace) -> dict[str, Any]:
    from tokencompose_core.fid_sets import build_fid_set

    dataset, captions = ("coco", args.coco_captions) if args.coco_captions else ("flickr30k", args.flickr30k_captions)
    # Unset options keep build_fid_set's defaults, the one place they are defined.
    options = {key: value for key in ("count", "seed") if (value := getattr(args, key)) is not None}
    return build_fid_set(dataset, captions, args.images, args.out, split=args.split, name=args.name, **options)


def _load_flow(target: str) -> Any:
    module, function = target.split(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as error:
        raise SystemExit(f"tokencompose: {module}.{function} is not available in this build ({error})")


def _is_user_error(error: BaseException) -> bool:
    """An error the user can fix from its message: configuration, inputs, weights, disk, checkpoints."""
    # Only a loaded module can have raised its error: a config error is not kept waiting for torch.
    checkpoints = sys.modules.get("tokencompose_core.checkpoints")
    extra = (checkpoints.CheckpointError,) if checkpoints else ()
    # StorageError is an OSError; disk full and failed uploads name the URI and the cause.
    storage = sys.modules.get("tokencompose_core.storage")
    extra += (storage.StorageError,) if storage else ()
    return isinstance(error, (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                              local_server.ServerStartError, *extra))


class _UserErrorTracebacks(logging.Filter):
    """Drops Prefect's log records that carry a user error's traceback: the CLI prints that error in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or not _is_user_error(error)


def _check_input(command: str, config: PipelineConfig, input_uri: str | None) -> None:
    """The first stage's input exists and lies under the allowed roots: checked before Prefect starts.

    A default input other than the manifest (the newest upstream output) is found by the flow.
    """
    from tokencompose_core import storage

    first = "nouns" if command == "run" else command
    uri = input_uri or (config.nouns.manifest if first == "nouns" else None)
    if first == "nouns" and not uri:
        raise ValueError("no manifest: pass --input <manifest.jsonl|.parquet> or set nouns.manifest")
    if uri:
        storage.check_input(uri, config.storage)
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri} does not exist (the input of `tokencompose {command}`)")


@contextmanager
def _prefect_api() -> Iterator[None]:
    """Flows report to the API the user configured, else to the shared local server."""
    if local_server.configured_api_url():
        yield
        return
    url = local_server.ensure_server()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url  # for the processes a flow starts (Dask workers, accelerate launch)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def _server(action: str) -> Any:
    if action == "stop":
        return "stopped the local Prefect server" if local_server.stop() else "no local Prefect server was running"
    if action == "start":
        configured = local_server.configured_api_url()
        if configured:
            return f"PREFECT_API_URL is set ({configured}): commands use that server"
        local_server.ensure_server()
    return local_server.status() or "no local Prefect server is running"


def _run(args: argparse.Namespace) -> Any:
    if args.command == "server":
        return _server(args.action)
    if args.command == "fid-reference":  # no flow: it only reads a captions file and writes two files
        return _fid_reference(args)
    if args.command == "demo":
        from tokencompose_core.demo import load_demo_config

        load_demo_config(args.quick, args.out, args.overrides, args.profile)  # fail fast, before Prefect starts
        with _prefect_api():
            return _load_flow("flows.demo:demo_flow")(quick=args.quick, out=args.out, overrides=list(args.overrides),
                                                      profile=args.profile)
    from tokencompose_core.config import load_config

    config = load_config(args.profile, args.overrides)  # fail fast, before Prefect starts
    _check_input(args.command, config, args.input_uri)
    with _prefect_api():
        return _run_stage(args, config)


def _run_stage(args: argparse.Namespace, config: PipelineConfig) -> Any:
    from tasks.common import configured

    target = RUN[0] if args.command == "run" else STAGES[args.command].flow
    # The profile picks the task runner (default or Dask) and the result storage.
    flow = configured(_load_flow(target), config)
    kwargs: dict[str, Any] = {"profile": args.profile, "overrides": list(args.overrides)}
    if args.input_uri:
        kwargs["input_uri"] = args.input_uri
    return flow(**kwargs)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet = None if args.debug else _UserErrorTracebacks()
    for name in _RUN_LOGGERS if quiet else ():
        logging.getLogger(name).addFilter(quiet)
    try:
        result = _run(args)
    except Exception as error:
        if args.debug or not _is_user_error(error):
            raise
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"tokencompose: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2
    finally:
        for name in _RUN_LOGGERS if quiet else ():
            logging.getLogger(name).removeFilter(quiet)
    print(json.dumps(result, indent=2, default=str) if not isinstance(result, str) else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
