"""Stand-ins for peers across a service boundary, shared by the suites that need them."""

from __future__ import annotations

from collections import Counter
from typing import Any

from aiohttp import web

from tests.support import free_port

__all__ = ["FakeRegistry"]


class FakeRegistry:
    """Just enough of the Eureka REST API: look-ups (counted), registrations, the dashboard."""

    def __init__(self, topology: dict[str, list[int]]) -> None:
        self.topology = {app.upper(): ports for app, ports in topology.items()}
        self.lookups: Counter[str] = Counter()
        self.registered: dict[str, dict[str, Any]] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None

    def _instance(self, app: str, port: int) -> dict[str, Any]:
        return {
            "instanceId": f"127.0.0.1:{app.lower()}:{port}",
            "app": app,
            "ipAddr": "127.0.0.1",
            "hostName": "127.0.0.1",
            "port": {"$": port, "@enabled": "true"},
            "status": "UP",
        }

    async def lookup(self, request: web.Request) -> web.Response:
        app = request.match_info["app"].upper()
        self.lookups[app] += 1
        instances = [self._instance(app, p) for p in self.topology.get(app, [])]
        instances += [i for i in self.registered.values() if i["app"] == app]
        if not instances:
            return web.json_response({"error": "unknown application"}, status=404)
        return web.json_response({"application": {"name": app, "instance": instances}})

    async def register(self, request: web.Request) -> web.Response:
        instance = (await request.json())["instance"]
        self.registered[instance["instanceId"]] = instance
        return web.Response(status=204)

    async def renew(self, request: web.Request) -> web.Response:
        known = request.match_info["instance"] in self.registered
        return web.Response(status=200 if known else 404)

    async def cancel(self, request: web.Request) -> web.Response:
        self.registered.pop(request.match_info["instance"], None)
        return web.Response(status=200)

    async def dashboard(self, _request: web.Request) -> web.Response:
        return web.Response(
            text="<html>Instances currently registered</html>", content_type="text/html"
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/eureka/apps/{app}", self.lookup)
        app.router.add_post("/eureka/apps/{app}", self.register)
        app.router.add_put("/eureka/apps/{app}/{instance}", self.renew)
        app.router.add_delete("/eureka/apps/{app}/{instance}", self.cancel)
        app.router.add_get("/eureka/web", self.dashboard)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/eureka"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
