"""Eureka's wire format: content negotiation, XML both ways, and what py-eureka-client parses."""

from __future__ import annotations

from xml.etree import ElementTree

import pytest
from py_eureka_client.eureka_basic import _build_application, _build_applications

from shop.registry.dashboard import describe_age, render_dashboard
from shop.registry.domain import Lease, new_lease
from shop.registry.eureka import (
    UnreadableBody,
    application_document,
    applications_document,
    parse_registration,
    prefers_xml,
    to_xml,
)

T0 = 1_700_000_000.0


def lease(instance_id: str, *, app: str = "order-service", status: str = "UP") -> Lease:
    return new_lease(
        app=app,
        document={
            "instanceId": instance_id,
            "hostName": "box",
            "ipAddr": "10.0.0.5",
            "status": status,
            "port": {"$": 8081, "@enabled": "true"},
            "dataCenterInfo": {
                "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
                "name": "MyOwn",
            },
            "metadata": {"management.port": "8081", "weird key!": "<&>"},
            "leaseInfo": {"durationInSecs": 30, "renewalIntervalInSecs": 10},
        },
        now=T0,
        default_duration_s=90,
    )


@pytest.mark.parametrize(
    ("accept", "xml"),
    [
        (None, True),
        ("", True),
        ("application/json", False),
        ("application/xml", True),
        ("text/xml", True),
        ("*/*", True),
        ("application/json, */*", False),
        ("application/xml;q=0.9, application/json", False),
        ("application/json;q=0.5, application/xml", True),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),
        ("application/json, application/xml", False),
        ("text/html", True),
    ],
)
def test_content_negotiation(accept: str | None, xml: bool) -> None:
    assert prefers_xml(accept) is xml


def test_py_eureka_client_reads_our_applications_xml() -> None:
    leases = [lease("a"), lease("b", status="DOWN"), lease("c", app="inventory-service")]
    body = to_xml(applications_document(leases, version=7))

    apps = _build_applications(ElementTree.fromstring(body.encode()))  # noqa: S314

    assert apps.versions__delta == "7"
    assert apps.apps__hashcode == "DOWN_1_UP_2_"
    order = apps.get_application("ORDER-SERVICE")
    assert sorted(i.instanceId for i in order.instances) == ["a", "b"]
    assert [i.instanceId for i in order.up_instances] == ["a"]
    first = order.get_instance("a")
    assert (first.ipAddr, first.port.port, first.port.enabled) == ("10.0.0.5", 8081, True)
    assert first.leaseInfo.durationInSecs == 30
    assert first.leaseInfo.lastRenewalTimestamp == int(T0 * 1000)
    assert first.overriddenstatus == "UNKNOWN"
    assert first.dataCenterInfo.className.endswith("DefaultDataCenterInfo")
    assert first.metadata["management.port"] == "8081"
    assert first.metadata["weird_key_"] == "<&>"


def test_py_eureka_client_reads_one_application() -> None:
    body = to_xml(application_document("ORDER-SERVICE", [lease("a")]))

    app = _build_application(ElementTree.fromstring(body))  # noqa: S314

    assert app.name == "ORDER-SERVICE"
    assert app.get_instance("a").status == "UP"


def test_xml_registration_reads_like_json() -> None:
    body = b"""<instance>
      <instanceId>10.0.0.5:cart:9000</instanceId><hostName>box</hostName>
      <status>UP</status><port enabled="true">9000</port>
      <leaseInfo><durationInSecs>15</durationInSecs></leaseInfo>
      <metadata><zone>a</zone></metadata><metadata2/>
    </instance>"""

    document = parse_registration(body, content_type="application/xml")
    opened = new_lease(app="cart", document=document, now=T0, default_duration_s=90)

    assert opened.instance_id == "10.0.0.5:cart:9000"
    assert opened.port == 9000
    assert opened.duration_s == 15
    assert opened.document["metadata"] == {"zone": "a"}


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"\xff\xfe",
        b"<instance><unclosed></instance>",
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><instance>&a;</instance>',
    ],
)
def test_unreadable_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(UnreadableBody):
        parse_registration(body, content_type=None)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b'{"instance": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3001,
        # Shallow enough for json.loads, too deep for the XML writer of every later listing.
        b'{"instance": {"instanceId": "x", "m": ' + b'{"a": ' * 900 + b"1" + b"}" * 902,
        b"<a>" * 100_000,
        b"<a>" * 100_000 + b"</a>" * 100_000,
        b'{"instance": {"instanceId": "x", "n": NaN}}',
        b'{"instance": {"instanceId": "x", "n": -1e400}}',
        b'{"instance": {"instanceId": "x", "n": ' + b"9" * 5000 + b"}}",
    ],
)
def test_hostile_bodies_are_unreadable_not_a_crash(body: bytes) -> None:
    with pytest.raises(UnreadableBody):
        parse_registration(body, content_type=None)


def test_eureka_sized_nesting_is_read() -> None:
    body = b'{"instance": {"instanceId": "x", "m": ' + b'{"a": ' * 20 + b"1" + b"}" * 22
    assert parse_registration(body, content_type="application/json")["instanceId"] == "x"


def test_a_body_without_instance_has_none() -> None:
    assert parse_registration(b'{"app": "x"}', content_type="application/json") is None
    assert parse_registration(b"[1, 2]", content_type="application/json") is None


def test_dashboard_escapes_what_instances_send() -> None:
    hostile = new_lease(
        app="cart",  # an application name cannot hold markup any more (letters, digits, _.-)
        document={"instanceId": "<img src=x onerror=alert(1)>", "ipAddr": "<b>", "port": 1},
        now=T0,
        default_duration_s=90,
    )

    page = render_dashboard([hostile], now=T0 + 75, started_at=T0, eviction_interval_s=5)

    assert "<img" not in page and "<b>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "1 min 15 s ago" in page
    assert "in 15 s" in page


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (59.9, "59 s"), (61, "1 min 1 s"), (3_660, "1 h 1 min"), (200_000, "2 d 7 h")],
)
def test_ages_read_naturally(seconds: float, text: str) -> None:
    assert describe_age(seconds) == text


def test_a_utf16_body_cannot_smuggle_a_doctype_past_the_parser() -> None:
    # A byte search for "<!DOCTYPE" never saw it in UTF-16; the parser itself refuses it now.
    body = (
        '<?xml version="1.0" encoding="UTF-16"?>'
        '<!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]><instance>&b;</instance>'
    ).encode("utf-16")
    with pytest.raises(UnreadableBody, match="DOCTYPE"):
        parse_registration(body, content_type="application/xml")


def test_a_utf16_body_without_a_doctype_is_read() -> None:
    body = "<instance><instanceId>a</instanceId></instance>".encode("utf-16")
    assert parse_registration(body, content_type="application/xml") == {"instanceId": "a"}
