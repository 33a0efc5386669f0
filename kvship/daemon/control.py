"""Control plane (aiohttp): health, Prometheus metrics and the transfer list, for ops."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from ..aio.framed import split_hostport
from ..ratelimit import RateError, format_rate, parse_burst, parse_rate

if TYPE_CHECKING:
    from .server import Daemon

DAEMON_KEY: web.AppKey[Daemon] = web.AppKey("daemon")
ROUTER_KEY: web.AppKey[Any] = web.AppKey("router")  # a kvship.router.Router, made lazily


async def healthz(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    status = "draining" if daemon.draining else "ok"
    return web.json_response(
        {
            "status": status,
            "node": daemon.config.node_name,
            "version": __version__,
            "uptime_s": round(time.time() - daemon.started, 3),
            "addresses": daemon.addresses,
        },
        status=503 if daemon.draining else 200,
    )


async def metrics(request: web.Request) -> web.Response:
    body = request.app[DAEMON_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def transfers(request: web.Request) -> web.Response:
    return web.json_response({"transfers": request.app[DAEMON_KEY].transfers_json()})


async def transfer(request: web.Request) -> web.Response:
    wanted = request.match_info["transfer_id"]
    for item in request.app[DAEMON_KEY].transfers_json():
        if item["transfer_id"] == wanted or item["request_id"] == wanted:
            return web.json_response(item)
    return web.json_response({"error": f"no transfer {wanted!r}"}, status=404)


async def links(request: web.Request) -> web.Response:
    return web.json_response({"links": request.app[DAEMON_KEY].links_json()})


async def put_link(request: web.Request) -> web.Response:
    """Change one peer link's rate limit at run time: {"rate": "1gbit", "burst": "16MiB"}.

    Running transfers keep going at the new rate. A bad value changes nothing (400)."""
    daemon = request.app[DAEMON_KEY]
    peer = request.match_info["peer"]
    try:
        split_hostport(peer)
        body = await request.json()
        if not isinstance(body, dict) or not {"rate", "burst"} >= set(body) or not body:
            raise ValueError('body must be a JSON object with "rate" and/or "burst"')
        rate, burst = daemon.limits_for(peer)
        if "rate" in body:
            rate = parse_rate(str(body["rate"]), "rate")
        if "burst" in body:
            burst = parse_burst(str(body["burst"]), "burst")
        daemon.set_link_limits(peer, rate, burst)
    except (ValueError, RateError) as exc:  # json errors are ValueErrors too
        return web.json_response({"error": str(exc)}, status=400)
    link = daemon.links.get(peer)
    figures = link.figures_json() if link is not None else {"peer": peer, "connected": False}
    return web.json_response({**figures, "rate_limit": format_rate(rate), "burst_bytes": burst})


async def route(request: web.Request) -> web.Response:
    """One PrfaaS routing decision, judged on this daemon's live figures of the link to
    ``peer`` (read, not fetched). Body: prompt_tokens or token_ids, local_cached_tokens,
    remote_cached_tokens, peer, remote {queue_depth}. No link yet -> local, and says why.
    With token_ids and a model but no local_cached_tokens, the local prefix is this
    daemon's own block store's (the same answer as POST /v1/lookup)."""
    from ..router.policy import RouteError  # the planner loads on first use, not at start
    from ..router.scenario import planned_router

    daemon = request.app[DAEMON_KEY]
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise RouteError("body: must be a JSON object")
        if "local_cached_tokens" not in body and "model" in body and "token_ids" in body:
            body["local_cached_tokens"] = _cached_tokens(daemon, body)
        link = daemon.links.get(str(body.get("peer", "")))
        figures = link.figures_json() if link is not None else None
        router = request.app.get(ROUTER_KEY)
        if router is None:
            router = request.app[ROUTER_KEY] = planned_router()
        decision = router.decide_dict({**body, "link": figures})
    except (ValueError, RouteError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(decision)


async def lookup(request: web.Request) -> web.Response:
    """How many leading tokens' KV this daemon's block store holds for a prompt.

    Body: {"model": <layout dict> or "<preset name>", "tp_rank": 0, and either "keys": [hex
    block keys] (hashed once by the caller: the look-up is then a set walk) or "token_ids"}.
    """

    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        tokens = _cached_tokens(request.app[DAEMON_KEY], body)
    except ValueError as exc:  # LayoutError is a ValueError too
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response({"cached_tokens": tokens})


def _cached_tokens(daemon: Daemon, body: dict[str, Any]) -> int:
    """Leading tokens of the prompt whose KV the block store holds (ValueError if the body
    does not say which model, or which prompt)."""
    from ..layout.model import ModelLayout
    from ..layout.prefix import block_keys
    from ..layout.presets import preset

    model = body.get("model")
    try:
        layout = preset(model) if isinstance(model, str) else ModelLayout.from_dict(model)
        tp_rank = int(body.get("tp_rank", 0))
        if "keys" in body:
            keys = [bytes.fromhex(k) for k in body["keys"]]
            if any(len(k) != 16 for k in keys):
                raise ValueError("keys: block keys are 16 bytes (32 hex digits)")
        elif "token_ids" in body:
            keys = block_keys(body["token_ids"], layout, tp_rank)
        else:
            raise ValueError('give "keys" or "token_ids"')
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"lookup: {exc!r}") from exc
    return daemon.store_for(layout, tp_rank).match_prefix(keys) * layout.block_tokens


def make_app(daemon: Daemon) -> web.Application:
    app = web.Application()
    app[DAEMON_KEY] = daemon
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/transfers", transfers)
    app.router.add_get("/v1/transfers/{transfer_id}", transfer)
    app.router.add_get("/v1/links", links)
    app.router.add_put("/v1/links/{peer}", put_link)
    app.router.add_post("/v1/route", route)
    app.router.add_post("/v1/lookup", lookup)
    return app
