"""Control plane (aiohttp): health, Prometheus metrics and the transfer list, for ops."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__

if TYPE_CHECKING:
    from .server import Daemon

DAEMON_KEY: web.AppKey[Daemon] = web.AppKey("daemon")


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


def make_app(daemon: Daemon) -> web.Application:
    app = web.Application()
    app[DAEMON_KEY] = daemon
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/transfers", transfers)
    app.router.add_get("/v1/transfers/{transfer_id}", transfer)
    app.router.add_get("/v1/links", links)
    return app
