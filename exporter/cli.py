"""Command line (SPEC section 6): serve, demo, check-config."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import FLAGS, ConfigError, load_config
from .errors import StartError
from .logs import setup_logging
from .webconfig import load_web_config

DEMO_NEEDS_GRPC = (
    "step-runner-exporter demo: needs grpcio, which the demo extra installs:"
    " pip install 'step-runner-exporter[demo]'"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="step-runner-exporter",
        description="Byte-transparent sidecar on GitLab step-runner's socket that classifies "
        "every job's outcome and exports Prometheus metrics.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the sidecar")
    serve.add_argument("--config.file", dest="config_file", type=Path, help="YAML config file")
    for flag in FLAGS:
        # dest is the key itself, so the parsed flags are the overrides as they are.
        metavar = flag.key.replace(".", "_").upper()
        serve.add_argument(flag.flag, dest=flag.key, metavar=metavar, help=flag.help)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config.file", dest="config_file", type=Path, required=True)

    demo = sub.add_parser("demo", help="simulated step-runner + sidecar + simulated runner")
    demo.add_argument("--jobs", type=int, default=0, help="stop after N jobs (0: run until Ctrl-C)")
    demo.add_argument("--concurrency", type=int, default=8)
    demo.add_argument(
        "--web.listen-address", dest="web_listen_address", default="127.0.0.1:9854",
        help="HOST:PORT of /metrics (default 127.0.0.1:9854)",
    )  # fmt: skip
    demo.add_argument("--seed", type=int, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.config_file)
    if args.command == "serve":
        return _serve(args)
    try:
        from .demo import run_demo
    except ModuleNotFoundError as exc:
        if exc.name != "grpc":
            raise
        # grpcio is the demo's alone (its simulators are gRPC programs), not the sidecar's.
        print(DEMO_NEEDS_GRPC, file=sys.stderr)
        return 1

    return run_demo(
        jobs=args.jobs,
        concurrency=args.concurrency,
        web_listen_address=args.web_listen_address,
        seed=args.seed,
    )


def _check_config(path: Path) -> int:
    """Validate the config file and the web config file it names, if any."""
    try:
        config = load_config(path)
        if config.web.config_file is not None:
            load_web_config(config.web.config_file)
    except ConfigError as exc:
        print(f"{path}: invalid configuration:\n{exc}", file=sys.stderr)
        return 1
    print(f"{path}: OK")
    return 0


def _serve(args: argparse.Namespace) -> int:
    overrides = {
        flag.key: getattr(args, flag.key) for flag in FLAGS if getattr(args, flag.key) is not None
    }
    try:
        config = load_config(args.config_file, overrides)
    except ConfigError as exc:
        _start_failed(f"invalid configuration: {_one_line(exc)}")
        return 2
    setup_logging(config.log.level, config.log.format)
    from .app import Sidecar

    try:
        import uvloop
    except ImportError:  # optional: the stdlib loop works, only slower
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(Sidecar(config).run())
    except StartError as exc:
        _start_failed(str(exc))
        return 1
    except ConfigError as exc:  # the web config file, read at start
        _start_failed(f"invalid web configuration: {_one_line(exc)}")
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _one_line(exc: ConfigError) -> str:
    # Every problem, each with its file and line, on the one line a failure to start
    # gets (SPEC section 6); check-config prints them one per line.
    return "; ".join(str(p) for p in exc.problems) or str(exc)


def _start_failed(message: str) -> None:
    print(f"step-runner-exporter: {' '.join(message.split())}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
