"""``kvshipd``: run one daemon until SIGTERM/SIGINT, then drain and stop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..addresses import join_hostport, split_hostport
from .config import Config, ConfigError, load_config, preflight
from .control import make_app
from .logs import setup_logging
from .notify import SystemdNotifier
from .server import Daemon

# A loop blocked this long gets every thread's traceback in the log (stderr): a daemon that
# answers nothing for seconds is otherwise a mystery after the fact.
LOOP_DUMP_AFTER_S = 5.0

log = logging.getLogger("kvship.daemon")


def settle_heap() -> None:
    """Put what exists at start (imports, config, listeners: ~50,000 objects that live as
    long as the daemon) out of the garbage collector's sight. A full collection walked them
    all on the loop's time: 12 ms quiet, 25-45 ms stalls of a fresh daemon's first
    transfers under load (tools/bench_loop_lag.py, full_collection)."""
    gc.collect()
    gc.freeze()


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``kvshipd`` and ``kvship serve`` (they override the config file)."""
    parser.add_argument("--config", "-c", help="TOML config file (see daemon/kvshipd.toml)")
    parser.add_argument("--node-name", dest="node_name")
    parser.add_argument("--peer-listen", dest="peer_listen", help="host:port for peer daemons")
    parser.add_argument("--engine-socket", dest="engine_socket", help="Unix socket for engines")
    parser.add_argument("--engine-listen", dest="engine_listen", help="host:port for engines")
    parser.add_argument("--control-listen", dest="control_listen", help="host:port, HTTP")
    parser.add_argument(
        "--peers", dest="peers", help="peer daemons kept connected: host:port,host:port"
    )
    parser.add_argument("--connections-per-peer", dest="connections_per_peer", type=int)
    parser.add_argument("--window-bytes", dest="window_bytes", type=int)
    parser.add_argument("--window-max-bytes", dest="window_max_bytes", type=int)
    parser.add_argument("--max-connections-per-peer", dest="max_connections_per_peer", type=int)
    parser.add_argument("--warmup-bytes", dest="warmup_bytes", type=int)
    parser.add_argument("--unacked-copy-min-rtt-s", dest="unacked_copy_min_rtt_s", type=float)
    parser.add_argument("--staging-bytes", dest="staging_bytes", type=int)
    parser.add_argument("--store-bytes", dest="store_bytes", type=int)
    parser.add_argument(
        "--compression", dest="compression", help="raw | zstd | split | auto (default)"
    )
    parser.add_argument("--compress-level", dest="compress_level", type=int)
    parser.add_argument("--peer-rate", dest="peer_rate", help="per peer link, e.g. 10gbit")
    parser.add_argument("--peer-burst", dest="peer_burst", help="e.g. 16MiB")
    parser.add_argument("--egress-rate", dest="egress_rate", help="all links together")
    parser.add_argument("--egress-burst", dest="egress_burst")
    parser.add_argument("--compress-workers", dest="compress_workers", type=int)
    parser.add_argument("--drain-timeout-s", dest="drain_timeout_s", type=float)
    parser.add_argument("--resume-timeout-s", dest="resume_timeout_s", type=float)
    parser.add_argument("--connect-timeout-s", dest="connect_timeout_s", type=float)
    parser.add_argument("--log-level", dest="log_level")
    parser.add_argument("--log-format", dest="log_format", help="plain (default) | json")
    parser.add_argument(
        "--ready-file", help="write the bound addresses as JSON here once listening"
    )
    trust = parser.add_argument_group("trust (files only: secrets never go on the command line)")
    trust.add_argument("--auth-key-file", dest="auth_key_file", help="pre-shared keys (TOML)")
    trust.add_argument("--auth-key-id", dest="auth_key_id", help="key proved to peers")
    trust.add_argument("--allow-senders", dest="allow_senders", help="key ids that may send")
    trust.add_argument("--tls-cert", dest="tls_cert", help="PEM certificate chain")
    trust.add_argument("--tls-key", dest="tls_key", help="PEM private key")
    trust.add_argument("--tls-ca", dest="tls_ca", help="PEM CA bundle peers must chain to")
    trust.add_argument("--control-token-file", dest="control_token_file")
    trust.add_argument("--engine-socket-group", dest="engine_socket_group")
    trust.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback listener without authentication (warned)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    keys = set(Config.__dataclass_fields__)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k in keys}
    return load_config(args.config, overrides)


def status_line(daemon: Daemon, state: str | None = None) -> str:
    """The one-line summary systemd shows (``systemctl status kvshipd``)."""
    links = sum(1 for link in daemon.links.links.values() if not link.dead)
    state = state or ("draining" if daemon.draining else "serving")
    return (
        f"{state}: transfers out "
        f"{len(daemon.registry.outgoing)} in {len(daemon.registry.incoming)}, "
        f"links up {links}, staged {daemon.budget.staged / (1 << 20):.1f} MiB"
    )


async def serve(
    config: Config,
    ready_file: str | None = None,
    reload: Callable[[], Config] | None = None,
    notifier: SystemdNotifier | None = None,
) -> int:
    notifier = SystemdNotifier.from_environ() if notifier is None else notifier
    daemon = Daemon(config)
    daemon.lag.dump_after_s = LOOP_DUMP_AFTER_S  # this process is the daemon's own
    await daemon.start()
    settle_heap()
    runner = web.AppRunner(make_app(daemon.control_view()), access_log=None)
    await runner.setup()
    if config.control_listen:
        host, port = split_hostport(config.control_listen)
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses  # the sockets' names; this site is the runner's only one
        if bound:
            h, p = bound[0][:2]
            daemon.addresses["control"] = join_hostport(h, p)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_hup() -> None:
        # RELOADING=1 ... READY=1 on every SIGHUP, refused or not, so that systemd (and
        # Type=notify-reload on systemd >= 253) always sees the reload end.
        notifier.reloading("reloading the configuration")
        outcome = "reload failed (see the log)"
        try:
            if reload is None:
                log.warning("SIGHUP: no config file to reload")
                outcome = "reload refused: no config file"
                return
            try:
                daemon.reload(reload())
            except (ConfigError, ValueError) as exc:
                log.error("SIGHUP: config not reloaded, nothing changed: %s", exc)
                outcome = f"reload refused, old config kept: {str(exc)[:200]}"
                return
            outcome = "reloaded"
        finally:
            notifier.ready(f"{outcome}; {status_line(daemon)}")

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    # The signal handlers are in place before anyone is told we are up: a SIGTERM or
    # SIGHUP right after READY must drain or reload, not kill.
    if ready_file:
        with open(ready_file + ".tmp", "w") as fh:
            json.dump(daemon.addresses, fh)
        os.replace(ready_file + ".tmp", ready_file)
    notifier.ready(status_line(daemon))
    notifier.start(lambda: status_line(daemon))
    try:
        await stop.wait()
        log.info("signal received: draining (up to %.0f s)", config.drain_timeout_s)
        notifier.stopping(status_line(daemon, f"draining (up to {config.drain_timeout_s:g} s)"))
        clean = await daemon.drain()
        if not clean:
            log.warning("drain deadline passed with transfers still running; aborting them")
        await daemon.close()
        await runner.cleanup()
    finally:
        await notifier.stop()  # the watchdog pings go on through the drain, then end
    log.info("stopped")
    return 0


def run(
    config: Config, ready_file: str | None = None, reload: Callable[[], Config] | None = None
) -> int:
    repeats = setup_logging(config.log_level, config.log_format, sys.stderr)
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a hard dependency
            return asyncio.run(serve(config, ready_file, reload))
        return uvloop.run(serve(config, ready_file, reload))
    finally:
        repeats.close()  # the counts of repeats still held back get out before exit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvshipd", description="kvship transfer daemon")
    add_serve_arguments(parser)
    parser.add_argument(
        "--check-config",
        metavar="FILE",
        help="check FILE (with the other flags) as a start would, print the result, exit: "
        "0 if it is good, 2 if not (run it before a reload)",
    )
    args = parser.parse_args(argv)
    if args.check_config:
        args.config = args.check_config
    try:
        config = config_from_args(args)
        preflight(config)
    except ConfigError as exc:
        print(f"kvshipd: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"kvshipd: {args.check_config}: configuration OK")
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        return run(config, args.ready_file, lambda: config_from_args(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
