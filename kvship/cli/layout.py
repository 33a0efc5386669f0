"""``kvship layout``: the built-in model layouts and what their KV costs per token/request."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..layout import presets
from ..layout.model import LayoutError, ModelLayout
from ..layout.presets import preset, preset_names
from .common import UsageError


def add_layout_parser(sub: Any) -> None:
    p = sub.add_parser(
        "layout",
        help="show model KV layouts (bytes per token, fixed bytes per request)",
        description="Built-in model layouts shaped like published hybrid models.",
    )
    lsub = p.add_subparsers(dest="layout_command", required=True, metavar="ACTION")
    show = lsub.add_parser("show", help="one layout's figures (a preset name or a .toml/.json)")
    show.add_argument("name", help="preset name, or a path to a layout .toml / .json file")
    show.add_argument("--tokens", type=int, default=None, help="also show bytes for N tokens")
    show.add_argument("--json", action="store_true", help="one JSON object on stdout")
    show.set_defaults(func=cmd_layout_show)
    ls = lsub.add_parser("list", help="the built-in presets")
    ls.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ls.set_defaults(func=cmd_layout_list)


def load_layout(name: str) -> ModelLayout:
    """A preset by name, else a layout file (``.toml`` or ``.json``)."""
    try:
        return presets.load_layout(name)
    except LayoutError as exc:
        raise UsageError(f"bad layout {name!r}: {exc}") from exc


def cmd_layout_show(args: argparse.Namespace) -> int:
    if args.tokens is not None and args.tokens < 0:
        raise UsageError(f"--tokens must be >= 0, got {args.tokens}")
    layout = load_layout(args.name)
    summary = layout.summary(args.tokens)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{layout.name}  (model id {layout.model_id}, tp rank {layout.tp_rank})")
    print(
        f"  layers             {len(layout.layers)}: {len(layout.full_layers)} full attention,"
        f" {len(layout.linear_layers)} linear/SWA/SSM"
    )
    print(f"  block              {layout.block_tokens} tokens, dtypes {', '.join(layout.dtypes)}")
    print(f"  KV bytes/token     {layout.kv_bytes_per_token:,}")
    print(f"  fixed bytes/req    {layout.fixed_bytes_per_request:,}")
    if args.tokens is not None:
        print(f"  bytes for {args.tokens:,} tokens  {layout.bytes_for(args.tokens):,}")
    return 0


def cmd_layout_list(args: argparse.Namespace) -> int:
    rows = [preset(n).summary() for n in preset_names()]
    if args.json:
        print(json.dumps({"presets": rows}))
        return 0
    print(f"{'preset':<18} {'layers':>6} {'full':>5} {'bytes/token':>12} {'fixed bytes/req':>16}")
    for r in rows:
        print(
            f"{r['name']:<18} {r['layers']:>6} {r['full_layers']:>5}"
            f" {r['kv_bytes_per_token']:>12,} {r['fixed_bytes_per_request']:>16,}"
        )
    return 0
