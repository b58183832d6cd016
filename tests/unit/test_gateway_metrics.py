"""The gateway's request metrics (``ProxyMetrics``, gateway/api.py): the proxy counts in plain
ints, and ``/metrics`` must say exactly what prometheus_client's counter and histogram said
when the proxy counted into them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from prometheus_client import (
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from shop.gateway.api import Proxy, ProxyMetrics
from shop.gateway.domain import Access, public_route_table
from shop.platform.middleware import HttpMetrics

SERVICE = "api-gateway"

# (method, route, status, seconds): on and around the buckets' bounds, past the last one,
# a route of the proxy's that the gateway's own endpoints share ("unmatched").
PROXIED = [
    ("GET", "/api/product", 200, 0.0004),
    ("GET", "/api/product", 200, 0.001),  # on a bound: in its bucket, as the histogram does
    ("GET", "/api/product", 200, 0.0010001),
    ("GET", "/api/product", 404, 0.3),
    ("HEAD", "/api/product", 200, 2.5),
    ("POST", "/api/order", 201, 0.04),
    ("POST", "unmatched", 404, 12.0),
    ("GET", "unmatched", 404, 0.002),
]
OWN = [  # what MetricsMiddleware counts for the gateway's own endpoints
    ("GET", "/health", 200, 0.003),
    ("GET", "unmatched", 404, 0.007),
]

Sample = tuple[str, tuple[tuple[str, str], ...], float | str]


def _samples(metrics: HttpMetrics) -> set[tuple[str, str, str, Sample]]:
    """Every sample of the exposition as Prometheus parses it, ``_created`` as "created"."""
    text = generate_latest(metrics.registry).decode()
    return {
        (
            family.name,
            family.documentation,
            family.type,
            (
                sample.name,
                tuple(sorted(sample.labels.items())),
                "created" if sample.name.endswith("_created") else sample.value,
            ),
        )
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _reference() -> HttpMetrics:
    """prometheus_client's own instruments, counting everything (the proxy's requests too)."""
    metrics = HttpMetrics(SERVICE)
    for method, route, status, seconds in PROXIED + OWN:
        metrics.requests.labels(SERVICE, method, route, str(status)).inc()
        metrics.latency.labels(SERVICE, method, route).observe(seconds)
    return metrics


def _gateway() -> tuple[HttpMetrics, ProxyMetrics]:
    metrics = HttpMetrics(SERVICE)
    counts = ProxyMetrics(metrics)
    for method, route, status, seconds in PROXIED:
        counts.observe(method, route, status, seconds)
    for method, route, status, seconds in OWN:
        metrics.requests.labels(SERVICE, method, route, str(status)).inc()
        metrics.latency.labels(SERVICE, method, route).observe(seconds)
    return metrics, counts


@pytest.fixture
def created_off() -> Iterator[None]:
    disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        enable_created_metrics()  # type: ignore[no-untyped-call]


def test_the_exposition_is_the_counter_and_histograms() -> None:
    metrics, _ = _gateway()
    expected = _samples(_reference())
    assert _samples(metrics) == expected
    names = {sample[0] for *_, sample in expected}
    assert "shop_http_requests_created" in names
    assert "shop_http_request_duration_seconds_created" in names


def test_a_series_counted_by_both_is_one_series_with_both_counts() -> None:
    metrics, _ = _gateway()
    unmatched = [
        sample
        for *_, sample in _samples(metrics)
        if dict(sample[1]).get("route") == "unmatched" and dict(sample[1]).get("method") == "GET"
    ]
    assert (
        "shop_http_requests_total",
        (("method", "GET"), ("route", "unmatched"), ("service", SERVICE), ("status", "404")),
        2.0,
    ) in unmatched
    count = [s for s in unmatched if s[0] == "shop_http_request_duration_seconds_count"]
    assert [s[2] for s in count] == [2.0]


def test_created_is_when_a_series_was_first_counted() -> None:
    before = time.time()
    metrics = HttpMetrics(SERVICE)
    counts = ProxyMetrics(metrics)
    counts.observe("GET", "/api/product", 200, 0.01)
    after = time.time()
    counts.observe("GET", "/api/product", 200, 0.01)
    text = generate_latest(metrics.registry).decode()
    created = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.endswith("_created")
    ]
    assert len(created) == 2
    assert all(before <= value <= after for value in created)


@pytest.mark.usefixtures("created_off")
def test_no_created_series_when_prometheus_client_writes_none() -> None:
    metrics, _ = _gateway()
    samples = _samples(metrics)
    assert samples == _samples(_reference())
    assert not [s for *_, s in samples if s[0].endswith("_created")]


def test_the_proxy_counts_under_its_route_or_unmatched() -> None:
    metrics = HttpMetrics(SERVICE)
    proxy = Proxy(
        routes=public_route_table(dashboard_access=Access.PUBLIC),
        metrics=metrics,
        max_body_bytes=1024,
        body_timeout_s=1.0,
    )
    identity = proxy.identify([])
    began = time.perf_counter()
    proxy.observe("GET", "/api/product", 200, began, identity)
    proxy.observe("GET", None, 404, began, identity)
    totals = {
        (dict(labels)["route"], dict(labels)["status"]): value
        for *_, (name, labels, value) in _samples(metrics)
        if name == "shop_http_requests_total"
    }
    assert totals == {("/api/product", "200"): 1.0, ("unmatched", "404"): 1.0}


def test_a_series_counted_by_both_was_created_when_first_counted_by_either() -> None:
    metrics = HttpMetrics(SERVICE)
    counts = ProxyMetrics(metrics)
    metrics.requests.labels(SERVICE, "GET", "unmatched", "404").inc()
    metrics.latency.labels(SERVICE, "GET", "unmatched").observe(0.01)
    theirs = {
        sample.name: sample.value
        for family in (*metrics.requests.collect(), *metrics.latency.collect())
        for sample in family.samples
        if sample.name.endswith("_created")
    }
    time.sleep(0.01)
    counts.observe("GET", "unmatched", 404, 0.01)
    text = generate_latest(metrics.registry).decode()
    created = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.endswith("_created")
    }
    assert created == theirs
    assert len(created) == 2
