"""Routes of the discovery server: Eureka's REST protocol under ``/eureka``, and the dashboard."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from shop.platform.problems import problem_response
from shop.registry.access import (
    NotAuthenticated,
    NotPermitted,
    Registrants,
    Throttled,
    WriteThrottle,
)
from shop.registry.dashboard import render_dashboard
from shop.registry.domain import (
    InstanceStatus,
    InvalidInstance,
    UnknownApplication,
    UnknownInstance,
)
from shop.registry.eureka import (
    UnreadableBody,
    application_document,
    applications_document,
    instance_document,
    parse_registration,
    prefers_xml,
    to_xml,
)
from shop.registry.service import Registry, RegistryFull, TooContended
from shop.registry.store import StoreUnavailable

__all__ = ["dashboard_router", "eureka_router", "install_error_answers"]

log = logging.getLogger("shop.registry")


def get_registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


RegistryDep = Annotated[Registry, Depends(get_registry)]


async def allow_write(app: str, request: Request) -> None:
    """Every write: throttled per client address first (failed guesses count too), then
    HTTP Basic credentials of the application named in the path."""
    throttle: WriteThrottle = request.app.state.write_throttle
    registrants: Registrants = request.app.state.registrants
    peer = request.client.host if request.client else "unknown"
    throttle.take(peer)
    registrants.check(app, request.headers.get("authorization"))


WRITE = [Depends(allow_write)]
StatusParam = Annotated[InstanceStatus | None, Query(description="Ignored: Eureka's heartbeat")]

eureka_router = APIRouter(prefix="/eureka", tags=["discovery (Eureka REST)"])
dashboard_router = APIRouter(tags=["dashboard"])

_REGISTRATION_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": ["instance"]},
                "example": {
                    "instance": {
                        "instanceId": "127.0.0.1:order-service:8081",
                        "hostName": "127.0.0.1",
                        "ipAddr": "127.0.0.1",
                        "status": "UP",
                        "port": {"$": 8081, "@enabled": "true"},
                        "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 90},
                    }
                },
            },
            "application/xml": {"schema": {"type": "string"}},
        },
    }
}


def _negotiated(request: Request, document: dict[str, Any]) -> Response:
    if prefers_xml(request.headers.get("accept")):
        return Response(to_xml(document), media_type="application/xml")
    return JSONResponse(document)


@eureka_router.post(
    "/apps/{app}",
    status_code=204,
    response_class=Response,
    openapi_extra=_REGISTRATION_BODY,
    dependencies=WRITE,
)
async def register(app: str, request: Request, registry: RegistryDep) -> Response:
    body = await request.body()
    instance = parse_registration(body, content_type=request.headers.get("content-type"))
    if instance is None:
        raise InvalidInstance({"instance": "is required"})
    await registry.register(app, instance)
    return Response(status_code=204)


@eureka_router.put("/apps/{app}/{instance_id}", response_class=Response, dependencies=WRITE)
async def renew(
    app: str,
    instance_id: str,
    registry: RegistryDep,
    status: StatusParam = None,
    last_dirty: Annotated[int | None, Query(alias="lastDirtyTimestamp")] = None,
) -> Response:
    await registry.renew(app, instance_id)
    return Response(status_code=200)


@eureka_router.delete("/apps/{app}/{instance_id}", response_class=Response, dependencies=WRITE)
async def cancel(app: str, instance_id: str, registry: RegistryDep) -> Response:
    await registry.cancel(app, instance_id)
    return Response(status_code=200)


@eureka_router.put("/apps/{app}/{instance_id}/status", response_class=Response, dependencies=WRITE)
async def override_status(
    app: str,
    instance_id: str,
    value: Annotated[InstanceStatus, Query(description="The status to impose")],
    registry: RegistryDep,
) -> Response:
    await registry.override_status(app, instance_id, value)
    return Response(status_code=200)


@eureka_router.delete(
    "/apps/{app}/{instance_id}/status", response_class=Response, dependencies=WRITE
)
async def remove_override(app: str, instance_id: str, registry: RegistryDep) -> Response:
    await registry.remove_override(app, instance_id)
    return Response(status_code=200)


@eureka_router.get("/apps", response_model=None)
# Eureka clients (Spring's, py-eureka-client) ask for "apps/": answer rather than redirect.
@eureka_router.get("/apps/", response_model=None, include_in_schema=False)
async def applications(request: Request, registry: RegistryDep) -> Response:
    listing = await registry.listing()
    document = applications_document(listing.leases, version=listing.version)
    return _negotiated(request, document)


@eureka_router.get("/apps/delta", response_model=None)
async def delta(request: Request, registry: RegistryDep) -> Response:
    """The full registry: a valid delta, as every client merges it and checks the hashcode."""
    listing = await registry.listing()
    document = applications_document(listing.leases, version=listing.version)
    return _negotiated(request, document)


@eureka_router.get("/apps/{app}", response_model=None)
async def application(app: str, request: Request, registry: RegistryDep) -> Response:
    leases = await registry.application(app)
    return _negotiated(request, application_document(leases[0].app, leases))


@eureka_router.get("/apps/{app}/{instance_id}", response_model=None)
async def app_instance(
    app: str, instance_id: str, request: Request, registry: RegistryDep
) -> Response:
    return _negotiated(request, instance_document(await registry.instance(app, instance_id)))


@eureka_router.get("/instances/{instance_id}", response_model=None)
async def instance(instance_id: str, request: Request, registry: RegistryDep) -> Response:
    return _negotiated(request, instance_document(await registry.find_instance(instance_id)))


@dashboard_router.get("/eureka/web", response_class=HTMLResponse)
async def dashboard(request: Request, registry: RegistryDep) -> HTMLResponse:
    page = render_dashboard(
        await registry.leases(),
        now=registry.now(),
        started_at=registry.started_at,
        eviction_interval_s=request.app.state.eviction_interval_s,
    )
    return HTMLResponse(page)


@dashboard_router.get("/", include_in_schema=False)
async def home() -> RedirectResponse:
    return RedirectResponse("/eureka/web")


def _refused(request: Request, exc: Exception) -> None:
    # Who tried what, never with which credentials.
    peer = request.client.host if request.client else "unknown"
    log.warning("%s %s from %s refused: %s", request.method, request.url.path, peer, exc)


def install_error_answers(app: FastAPI) -> None:
    """Domain errors become problem+json: no credentials → 401, another application's → 403,
    too many writes → 429, registry full → 409, unknown → 404, invalid → 422, unreadable → 400;
    a store that cannot be reached (or an instance changed by others at every try) → 503."""

    async def not_found(request: Request, exc: Exception) -> Response:
        return problem_response(404, instance=request.url.path, detail=str(exc))

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, InvalidInstance)  # noqa: S101 - registered for it only
        return problem_response(
            422,
            instance=request.url.path,
            detail="The instance cannot be registered; see errors.",
            errors=exc.errors,
        )

    async def unreadable(request: Request, exc: Exception) -> Response:
        return problem_response(400, instance=request.url.path, detail=str(exc))

    async def unavailable(request: Request, exc: Exception) -> Response:
        log.warning("%s %s answered 503: %s", request.method, request.url.path, exc)
        detail = (
            "The registry's store cannot be reached; try again shortly."
            if isinstance(exc, StoreUnavailable)
            else str(exc)
        )
        return problem_response(
            503, instance=request.url.path, detail=detail, headers={"Retry-After": "1"}
        )

    async def unauthenticated(request: Request, exc: Exception) -> Response:
        _refused(request, exc)
        return problem_response(
            401,
            instance=request.url.path,
            detail=str(exc),
            headers={"WWW-Authenticate": 'Basic realm="shop-registry"'},
        )

    async def forbidden(request: Request, exc: Exception) -> Response:
        _refused(request, exc)
        return problem_response(403, instance=request.url.path, detail=str(exc))

    async def throttled(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Throttled)  # noqa: S101 - registered for it only
        _refused(request, exc)
        return problem_response(
            429,
            instance=request.url.path,
            detail=str(exc),
            headers={"Retry-After": str(exc.retry_after_s)},
        )

    async def full(request: Request, exc: Exception) -> Response:
        log.warning("%s %s refused: %s", request.method, request.url.path, exc)
        return problem_response(409, instance=request.url.path, detail=str(exc))

    app.add_exception_handler(NotAuthenticated, unauthenticated)
    app.add_exception_handler(NotPermitted, forbidden)
    app.add_exception_handler(Throttled, throttled)
    app.add_exception_handler(RegistryFull, full)
    app.add_exception_handler(UnknownInstance, not_found)
    app.add_exception_handler(UnknownApplication, not_found)
    app.add_exception_handler(InvalidInstance, invalid)
    app.add_exception_handler(UnreadableBody, unreadable)
    app.add_exception_handler(StoreUnavailable, unavailable)
    app.add_exception_handler(TooContended, unavailable)
