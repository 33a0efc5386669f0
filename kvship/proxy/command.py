"""``kvship proxy``: argparse wiring; the proxy itself is :mod:`kvship.proxy.app`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import signal
import sys
from pathlib import Path
from typing import Any

from ..addresses import split_hostport
from ..layout.model import LayoutError, ModelLayout
from ..layout.presets import load_layout
from ..ratelimit.rates import RateError, parse_rate
from .app import ProxySettings, serve

EXIT_USAGE = 2  # as the rest of the kvship command


def add_proxy_parser(sub: Any) -> None:
    p = sub.add_parser(
        "proxy",
        help="OpenAI-compatible front routing each request's prefill local or remote",
        description="Serve /v1/completions and /v1/chat/completions over local PD servers and "
        "remote prefill servers (vLLM with kvship's connector); each request's prefill runs "
        "where the PrfaaS router says, its reason in the X-Kvship-Route-Reason header.",
    )
    p.add_argument("--listen", default="127.0.0.1:8000", metavar="HOST:PORT")
    p.add_argument(
        "--local",
        action="append",
        required=True,
        metavar="URL",
        help="a local PD server (kv_both); repeat for more",
    )
    p.add_argument(
        "--remote",
        action="append",
        default=[],
        metavar="URL",
        help="a remote prefill server (kv_producer); repeat for more",
    )
    p.add_argument(
        "--link-control",
        metavar="HOST:PORT",
        help="control plane of the kvshipd that sends the KV (its link figures)",
    )
    p.add_argument(
        "--link-peer",
        metavar="HOST:PORT",
        help="which of that daemon's links carries the KV (default: the first)",
    )
    p.add_argument(
        "--local-control",
        metavar="HOST:PORT",
        help="the local decode kvshipd's control plane (cached prefix lookups)",
    )
    p.add_argument(
        "--layout",
        metavar="PRESET_OR_FILE",
        help="the model's KV layout: lookups and KV bytes per token",
    )
    p.add_argument(
        "--threshold-tokens",
        type=float,
        default=19_400.0,
        metavar="N",
        help="prefill remotely above this many uncached tokens (case study: 19400)",
    )
    p.add_argument(
        "--max-link-wait-s",
        type=float,
        default=5.0,
        metavar="S",
        help="KV that would wait longer on the link: prefill locally (0: off)",
    )
    p.add_argument(
        "--egress-cap",
        metavar="RATE",
        help="the link's capacity when the daemon sets no cap, e.g. 100gbit",
    )
    p.add_argument("--ready-file", metavar="PATH", help='write {"listen": ...} once bound')
    p.set_defaults(func=cmd_proxy)


def settings_from_args(args: argparse.Namespace) -> ProxySettings:
    for name in ("link_control", "link_peer", "local_control"):
        value = getattr(args, name)
        if value is not None:
            split_hostport(value)  # ValueError names it
    if not args.threshold_tokens > 0:
        raise ValueError(f"--threshold-tokens must be > 0, got {args.threshold_tokens}")
    if args.max_link_wait_s < 0:
        raise ValueError(f"--max-link-wait-s must be >= 0, got {args.max_link_wait_s}")
    cap = None
    if args.egress_cap:
        try:
            cap = parse_rate(args.egress_cap, "--egress-cap")
        except RateError as exc:
            raise ValueError(str(exc)) from exc
        cap = None if math.isinf(cap) else cap
    return ProxySettings(
        local=tuple(args.local),
        remote=tuple(args.remote),
        link_control=args.link_control,
        link_peer=args.link_peer,
        local_control=args.local_control,
        layout=_layout(args.layout) if args.layout else None,
        threshold_tokens=args.threshold_tokens,
        max_link_wait_s=args.max_link_wait_s or None,
        egress_cap_Bps=cap,
    )


def _layout(name: str) -> ModelLayout:
    try:
        return load_layout(name)
    except LayoutError as exc:
        raise ValueError(f"--layout {name!r}: {exc}") from exc


def cmd_proxy(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        host, port = split_hostport(args.listen)
    except ValueError as exc:
        print(f"kvship proxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kvship").setLevel(logging.INFO)  # every routing decision

    def ready(address: str) -> None:
        logging.getLogger("kvship.proxy").info("kvship proxy listening on http://%s", address)
        if args.ready_file:
            Path(args.ready_file).write_text(json.dumps({"listen": address}))

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        await serve(settings, host, port, ready)

    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(main())
    return 0
