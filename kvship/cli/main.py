"""``kvship``: the parser and the dispatch; each command group lives in its own module.

Expected failures (a daemon not running, a transfer that failed, a bad file or size) end
as one line on stderr and a non-zero exit: 2 for the user's input, 1 for the rest.
Tracebacks are for bugs (and for ``-v``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..errors import DaemonUnavailable, KvshipError, TransferError
from .common import EXIT_RUNTIME, EXIT_USAGE, CliError

log = logging.getLogger("kvship.cli")


def add_serve_parser(sub: Any) -> None:
    """``kvship serve`` is ``kvshipd``: the same flags, from the same function."""
    from ..daemon.main import add_serve_arguments

    p = sub.add_parser("serve", help="run the kvship daemon (same as kvshipd)")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..daemon.config import ConfigError, preflight
    from ..daemon.main import config_from_args, run

    if args.verbose and args.log_level is None:
        args.log_level = "debug"
    try:
        config = config_from_args(args)
        preflight(config)
    except ConfigError as exc:
        raise CliError(f"bad configuration: {exc}", EXIT_USAGE) from exc
    return run(config, args.ready_file, lambda: config_from_args(args))


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """bench raises ValueError for bad sizes and RuntimeError when one of its processes
    fails: make those the one-line errors every other command gives."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ValueError as exc:
            raise CliError(str(exc), EXIT_USAGE) from exc
        except RuntimeError as exc:
            raise CliError(f"bench failed: {exc}") from exc

    return run


def build_parser() -> argparse.ArgumentParser:
    from ..bench.run import add_bench_parser
    from ..conformance.command import add_conformance_parser
    from ..plan.command import add_plan_parser, add_simulate_parser
    from ..proxy.command import add_proxy_parser
    from ..router.command import add_route_parser
    from .demo import add_demo_parser
    from .keygen import add_keygen_parser
    from .layout import add_layout_parser
    from .status import add_status_parser
    from .transfer import add_recv_parser, add_send_parser

    parser = argparse.ArgumentParser(
        prog="kvship",
        description="Ship LLM KV cache between datacenters (Prefill-as-a-Service).",
    )
    parser.add_argument("--version", action="version", version=f"kvship {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(sub)
    add_send_parser(sub)
    add_recv_parser(sub)
    add_status_parser(sub)
    add_bench_parser(sub)
    bench = sub.choices["bench"]
    bench.set_defaults(func=_guarded(bench.get_default("func")))
    add_plan_parser(sub)
    add_simulate_parser(sub)
    _add_scenarios(sub.choices["simulate"])
    add_route_parser(sub)
    add_demo_parser(sub)
    add_layout_parser(sub)
    add_conformance_parser(sub)
    add_proxy_parser(sub)
    add_keygen_parser(sub)
    return parser


def _add_scenarios(simulate: argparse.ArgumentParser) -> None:
    """``kvship simulate --scenario link-drop``: the router's scenarios ride on ``simulate``
    here in the CLI, so the pure planner never imports the router."""
    from ..router.command import run_scenario
    from ..router.scenario import SCENARIOS

    simulate.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default=None,
        help="link-drop: fixed t vs the adaptive router when the link drops mid-run",
    )
    simulate.add_argument(
        "--after-gbps", type=float, default=8.0, help="link-drop: capacity after the drop"
    )
    plain = simulate.get_default("func")

    def run(args: argparse.Namespace) -> int:
        return run_scenario(args) if args.scenario else plain(args)

    simulate.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":  # the daemon sets up its own logging from --log-level
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    try:
        return int(args.func(args))
    except CliError as exc:
        return _fail(exc, str(exc), exc.exit_code, args.verbose)
    except DaemonUnavailable as exc:
        return _fail(exc, f"{exc} (is kvshipd running? see --daemon)", EXIT_RUNTIME, args.verbose)
    except TransferError as exc:
        return _fail(exc, f"transfer failed: {exc}", EXIT_RUNTIME, args.verbose)
    except KvshipError as exc:
        return _fail(exc, str(exc), EXIT_RUNTIME, args.verbose)
    except KeyboardInterrupt:
        print("kvship: interrupted", file=sys.stderr)
        return 130


def _fail(exc: BaseException, message: str, code: int, verbose: bool) -> int:
    if verbose:
        log.debug("details", exc_info=exc)
    print(f"kvship: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
