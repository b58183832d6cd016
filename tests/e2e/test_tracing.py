"""One order, one trace: the embedded system exporting spans over OTLP to a receiver here.

The receiver is the collector's own wire format: OTLP/HTTP, the body decoded with the
official protobuf definitions (``opentelemetry-proto``). The system is started for this
module alone, with the standard ``OTEL_*`` variables an operator would set, once for each
``ORDER_PRICE_SOURCE``: with the default price list the catalogue is not asked, with
``catalogue`` product-service is in every order's trace.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.shop_system import System, running_system

SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5  # SpanKind in OTLP's numbering
SERVICES = ("api-gateway", "order-service", "inventory-service", "notification-service")


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    system: str  # db.system.name of a statement's span, else ""
    links: tuple[str, ...]  # the span ids it links to


class Receiver:
    """An OTLP/HTTP trace endpoint keeping every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                receiver.take(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def take(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = attributes.get("service.name", "")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        Span(
                            service=service,
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            system=next(
                                (
                                    a.value.string_value
                                    for a in span.attributes
                                    if a.key == "db.system.name"
                                ),
                                "",
                            ),
                            links=tuple(link.span_id.hex() for link in span.links),
                        )
                    )
        with self._lock:
            self.spans.extend(spans)

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module", params=["price-list", "catalogue"])
def price_source(request: pytest.FixtureRequest) -> str:
    """The system's ``ORDER_PRICE_SOURCE``."""
    return str(request.param)


@pytest.fixture(scope="module")
def traced_system(
    price_source: str, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    """`shop up` on the embedded profile, every span exported to ``receiver``."""
    environment = {
        "SHOP_HEARTBEAT_INTERVAL_S": "1",
        "SHOP_REGISTRY_CACHE_TTL_S": "1",
        "REGISTRY_EVICTION_INTERVAL_S": "1",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: spans reach the receiver within the test
        "ORDER_PRICE_SOURCE": price_source,
    }
    with running_system(
        tmp_path_factory.mktemp("system-traced"), environment=environment
    ) as running:
        yield running.system


@pytest.fixture(scope="module")
def customer(traced_system: System) -> dict[str, str]:
    email = f"tracer-{uuid.uuid4().hex[:10]}@example.com"
    with httpx.Client(base_url=traced_system.gateway, timeout=10.0) as gateway:
        registered = gateway.post(
            "/auth/register", json={"name": "Ada", "email": email, "password": "engine-1843"}
        )
        assert registered.status_code == 201, registered.text
        login = gateway.get("/auth/getToken", auth=(email, "engine-1843"))
        assert login.status_code == 200, login.text
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


def _eventually(
    check: Callable[[], Any],
    *,
    within_s: float = 20.0,
    what: str,
    missing: Callable[[], str] | None = None,
) -> Any:
    """``check()``'s first truthy result; on time-out, fail naming ``what`` and, when given,
    what ``missing()`` says is still lacking (so a red run names the silent service)."""
    deadline = time.monotonic() + within_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            lacking = f": {missing()}" if missing else ""
            raise AssertionError(f"timed out waiting for {what}{lacking}")
        time.sleep(0.1)


def _whole(spans: list[Span]) -> bool:
    """One root, and every other span's parent in the trace."""
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if not s.parent_id]
    return len(roots) == 1 and all(s.parent_id in ids for s in spans if s.parent_id)


def test_one_order_is_one_trace_across_services_and_events(
    traced_system: System, receiver: Receiver, customer: dict[str, str], price_source: str
) -> None:
    priced_by_catalogue = price_source == "catalogue"
    services = {*SERVICES, "product-service"} if priced_by_catalogue else set(SERVICES)
    # The receiver outlives each system: this order's spans are the ones sent from now on.
    since = len(receiver.spans)
    with httpx.Client(base_url=traced_system.gateway, timeout=10.0) as gateway:
        placed = gateway.post(
            "/api/order",
            headers=customer,
            json={"orderLineItemDtoList": [{"skuCode": "pixel_8", "quantity": 1}]},
        )
        assert placed.status_code == 201, placed.text
        number = placed.json()["orderNumber"]
        _eventually(
            lambda: gateway.get(
                "/api/notifications", params={"orderNumber": number}, headers=customer
            ).json(),
            what="the order's notification",
        )

    def order_trace() -> str | None:
        for span in receiver.spans[since:]:
            if span.service == "order-service" and span.name == "POST /api/order":
                return span.trace_id
        return None

    trace_id = _eventually(order_trace, what="the order service's span")

    events = {("order-service", PRODUCER), ("notification-service", CONSUMER)}

    def whole_trace() -> list[Span] | None:
        spans = receiver.trace(trace_id)
        evented = events <= {(s.service, s.kind) for s in spans}
        traced = {s.service for s in spans} >= services
        return spans if traced and evented and _whole(spans) else None

    def lacking() -> str:
        spans = receiver.trace(trace_id)
        absent = sorted(services - {s.service for s in spans})
        kinds = sorted(
            f"{service} {'PRODUCER' if kind == PRODUCER else 'CONSUMER'}"
            for service, kind in events - {(s.service, s.kind) for s in spans}
        )
        parts = [f"{len(spans)} spans"]
        if absent:
            parts.append(f"no span from {', '.join(absent)}")
        if kinds:
            parts.append(f"no {' or '.join(kinds)} span")
        if spans and not _whole(spans):
            parts.append("not one parent-linked tree")
        return "; ".join(parts)

    spans = _eventually(whole_trace, what=f"the whole trace {trace_id}", missing=lacking)
    by_id = {s.span_id: s for s in spans}
    root = next(s for s in spans if not s.parent_id)
    assert root.service == "api-gateway", "the trace starts at the gateway"
    # The reservation is the order's call to the inventory; the notification is caused by
    # the event the order's outbox relay published.
    reservation = next(s for s in spans if (s.service, s.kind) == ("inventory-service", SERVER))
    call = by_id[reservation.parent_id]
    assert (call.service, call.kind) == ("order-service", CLIENT), "the reservation call's span"
    assert (by_id[call.parent_id].service, by_id[call.parent_id].kind) == ("order-service", SERVER)
    # One span per request at the gateway (docs/telemetry.md): the order's parent is the
    # proxy's server span, the root; no CLIENT span of the gateway's stands between them.
    order = next(s for s in spans if (s.service, s.kind) == ("order-service", SERVER))
    assert root.kind == SERVER and by_id[order.parent_id] == root
    if priced_by_catalogue:
        # The price look-up: the order's call to the catalogue, answered by product-service.
        pricing = next(s for s in spans if (s.service, s.kind) == ("product-service", SERVER))
        asked = by_id[pricing.parent_id]
        assert (asked.service, asked.kind) == ("order-service", CLIENT), "the price call's span"
        assert by_id[asked.parent_id] == order
    # Each service's statements are spans of their own under the work that made them.
    statements = {s.service for s in spans if s.kind == CLIENT and s.system == "sqlite"}
    assert {"order-service", "notification-service"} <= statements
    # The inventory applies concurrent reservations in one transaction: its statements
    # belong to the group's own trace, whose span links to each reservation's.
    group = _eventually(
        lambda: next((s for s in receiver.spans if reservation.span_id in s.links), None),
        what="the reservation group's span",
    )
    assert (group.service, group.name) == ("inventory-service", "reservation group")
    assert any(
        s.parent_id == group.span_id and s.system == "sqlite"
        for s in receiver.trace(group.trace_id)
    )
    consumer = next(s for s in spans if s.kind == CONSUMER)
    producer = by_id[consumer.parent_id]
    assert (producer.service, producer.kind) == ("order-service", PRODUCER)
    assert by_id[producer.parent_id].service == "order-service"


@pytest.mark.parametrize("price_source", ["price-list"], indirect=True)
def test_a_problems_trace_id_is_its_trace(
    traced_system: System, receiver: Receiver, customer: dict[str, str]
) -> None:
    with httpx.Client(base_url=traced_system.gateway, timeout=10.0) as gateway:
        refused = gateway.post("/api/order", headers=customer, json={"orderLineItemDtoList": 7})
    assert refused.status_code == 422, refused.text
    trace_id = refused.json()["traceId"]

    def spans() -> list[Span] | None:
        found = receiver.trace(trace_id)
        services = {s.service for s in found}
        return found if {"api-gateway", "order-service"} <= services and _whole(found) else None

    found = _eventually(spans, what=f"the spans of trace {trace_id}")
    assert next(s for s in found if not s.parent_id).service == "api-gateway"
