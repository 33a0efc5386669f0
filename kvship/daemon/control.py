"""Control plane (aiohttp): health, Prometheus metrics, transfers, links, routing and
prefix look-ups, for ops and schedulers.

It sees the daemon through a narrow :class:`ControlView`, and never runs heavy work on
the daemon's loop: the planner behind /v1/route is built, and prompts are hashed, in a
worker thread.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from ..addresses import split_hostport
from ..layout.model import ModelLayout
from ..ratelimit import RateError, format_rate, parse_burst, parse_rate
from .links import LinkPool
from .metrics import Metrics
from .registry import TransferRegistry
from .stores import StoreSet
from .trust import is_loopback

MUTATING = frozenset({"PUT", "POST", "DELETE", "PATCH"}) - {"POST"}  # POSTs here only query


@dataclass(frozen=True)
class ControlView:
    """What the control plane may read and change of a daemon."""

    health: Callable[[], dict[str, Any]]  # {"status": "ok" | "draining", ...}
    metrics: Metrics
    registry: TransferRegistry
    links: LinkPool
    stores: StoreSet
    control_token: Callable[[], str] = lambda: ""  # "" = mutating endpoints loopback only


VIEW_KEY: web.AppKey[ControlView] = web.AppKey("view")
ROUTER_KEY: web.AppKey[Any] = web.AppKey("router")  # a kvship.router.Router, made lazily
ROUTER_LOCK_KEY: web.AppKey[asyncio.Lock] = web.AppKey("router_lock")


async def healthz(request: web.Request) -> web.Response:
    health = {**request.app[VIEW_KEY].health(), "version": __version__}
    return web.json_response(health, status=503 if health["status"] == "draining" else 200)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[VIEW_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def transfers(request: web.Request) -> web.Response:
    return web.json_response({"transfers": request.app[VIEW_KEY].registry.to_json()})


async def transfer(request: web.Request) -> web.Response:
    wanted = request.match_info["transfer_id"]
    for item in request.app[VIEW_KEY].registry.to_json():
        if item["transfer_id"] == wanted or item["request_id"] == wanted:
            return web.json_response(item)
    return web.json_response({"error": f"no transfer {wanted!r}"}, status=404)


async def links(request: web.Request) -> web.Response:
    return web.json_response({"links": request.app[VIEW_KEY].links.to_json()})


async def put_link(request: web.Request) -> web.Response:
    """Change one peer link's rate limit at run time: {"rate": "1gbit", "burst": "16MiB"}.

    Running transfers keep going at the new rate. A bad value changes nothing (400)."""
    pool = request.app[VIEW_KEY].links
    peer = request.match_info["peer"]
    try:
        split_hostport(peer)
        body = await request.json()
        if not isinstance(body, dict) or not {"rate", "burst"} >= set(body) or not body:
            raise ValueError('body must be a JSON object with "rate" and/or "burst"')
        rate, burst = pool.limits_for(peer)
        if "rate" in body:
            rate = parse_rate(str(body["rate"]), "rate")
        if "burst" in body:
            burst = parse_burst(str(body["burst"]), "burst")
        pool.set_limits(peer, rate, burst)
    except (ValueError, RateError) as exc:  # json errors are ValueErrors too
        return web.json_response({"error": str(exc)}, status=400)
    figures = pool.figures(peer) or {"peer": peer, "connected": False}
    return web.json_response({**figures, "rate_limit": format_rate(rate), "burst_bytes": burst})


def _load_router() -> Any:
    """Import and build the planned router (~0.4 s of CPU: run in a worker thread)."""
    from ..router.scenario import planned_router

    return planned_router()


async def _router(app: web.Application) -> Any:
    router = app.get(ROUTER_KEY)
    if router is None:
        async with app[ROUTER_LOCK_KEY]:
            router = app.get(ROUTER_KEY)
            if router is None:
                router = app[ROUTER_KEY] = await asyncio.to_thread(_load_router)
    return router


async def route(request: web.Request) -> web.Response:
    """One PrfaaS routing decision, judged on this daemon's live figures of the link to
    ``peer`` (read, not fetched). Body: prompt_tokens or token_ids, local_cached_tokens,
    remote_cached_tokens, peer, remote {queue_depth}. No link yet -> local, and says why.
    With token_ids and a model but no local_cached_tokens, the local prefix is this
    daemon's own block store's (the same answer as POST /v1/lookup)."""
    view = request.app[VIEW_KEY]
    router = await _router(request.app)
    from ..router.policy import RouteError  # loaded with the router, in the worker

    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise RouteError("body: must be a JSON object")
        if "local_cached_tokens" not in body and "model" in body and "token_ids" in body:
            body["local_cached_tokens"] = await _cached_tokens(view.stores, body)
        figures = view.links.figures(str(body.get("peer", "")))
        decision = router.decide_dict({**body, "link": figures})
    except (ValueError, RouteError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(decision)


async def lookup(request: web.Request) -> web.Response:
    """How many leading tokens' KV this daemon's block store holds for a prompt.

    Body: {"model": <layout dict> or "<preset name>", "tp_rank": 0, and either "keys": [hex
    block keys] (hashed once by the caller: the look-up is then a set walk) or "token_ids"}.
    Read-only: a model with no store here has 0 tokens cached, and no store is made.
    """
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        tokens = await _cached_tokens(request.app[VIEW_KEY].stores, body)
    except ValueError as exc:  # LayoutError is a ValueError too
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response({"cached_tokens": tokens})


def _prompt_keys(body: dict[str, Any]) -> tuple[ModelLayout, int, list[bytes]]:
    """The model, tp rank and block keys a look-up body names (ValueError if it does not
    say which model, or which prompt). Hashes token ids: run it in a worker thread."""
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
    return layout, tp_rank, keys


async def _cached_tokens(stores: StoreSet, body: dict[str, Any]) -> int:
    """Leading tokens of the prompt whose KV the block stores hold."""
    layout, tp_rank, keys = await asyncio.to_thread(_prompt_keys, body)
    return stores.cached_blocks(layout, tp_rank, keys) * layout.block_tokens


@web.middleware
async def guard_changes(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Endpoints that change the daemon answer loopback clients, or a client with the
    bearer token of ``control_token_file``; anyone else gets 403 (reads stay open: metrics
    scrapers and routers need them)."""
    if request.method in MUTATING and not is_loopback(request.remote or ""):
        token = request.app[VIEW_KEY].control_token()
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not token or not hmac.compare_digest(given.encode(), token.encode()):
            why = "a wrong or missing bearer token" if token else "no control_token_file set"
            request.app[VIEW_KEY].metrics.control_refused.inc()
            return web.json_response(
                {
                    "error": f"{request.method} {request.path} from {request.remote}: {why}; "
                    "changes come from loopback or with Authorization: Bearer <token>"
                },
                status=403,
            )
    return await handler(request)


def make_app(view: ControlView) -> web.Application:
    app = web.Application(middlewares=[guard_changes])
    app[VIEW_KEY] = view
    app[ROUTER_LOCK_KEY] = asyncio.Lock()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/transfers", transfers)
    app.router.add_get("/v1/transfers/{transfer_id}", transfer)
    app.router.add_get("/v1/links", links)
    app.router.add_put("/v1/links/{peer}", put_link)
    app.router.add_post("/v1/route", route)
    app.router.add_post("/v1/lookup", lookup)
    return app
