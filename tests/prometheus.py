"""Reading a service's ``/metrics`` the way Prometheus does (its own text parser)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float | None:
    """The value of sample ``name`` whose labels include ``labels``; None if there is none."""
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None
