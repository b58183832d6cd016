"""Eureka's wire format: the JSON and XML documents, and which one a client asked for.

Eureka's JSON and XML carry the same tree: ``@name`` keys are XML attributes, ``$`` is an
element's text, lists are repeated elements. One converter each way covers every document.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any
from xml.etree import ElementTree

import defusedxml
import defusedxml.ElementTree

from shop.registry.domain import MAX_DEPTH, Lease, apps_hashcode

__all__ = [
    "UnreadableBody",
    "application_document",
    "applications_document",
    "instance_document",
    "parse_registration",
    "prefers_xml",
    "to_xml",
]

_NOT_NAME_CHAR = re.compile(r"[^A-Za-z0-9_.\-]")
# Eureka's JSON says overriddenStatus, its XML (and py-eureka-client) overriddenstatus.
_XML_NAMES = {"overriddenStatus": "overriddenstatus"}


class UnreadableBody(ValueError):
    """The request body is neither JSON nor XML we are willing to read."""


def instance_document(lease: Lease) -> dict[str, Any]:
    return {"instance": lease.as_instance()}


def _application(name: str, leases: Iterable[Lease]) -> dict[str, Any]:
    return {"name": name, "instance": [lease.as_instance() for lease in leases]}


def application_document(name: str, leases: Iterable[Lease]) -> dict[str, Any]:
    return {"application": _application(name, leases)}


def applications_document(leases: list[Lease], *, version: int) -> dict[str, Any]:
    by_app: dict[str, list[Lease]] = {}
    for lease in leases:
        by_app.setdefault(lease.app, []).append(lease)
    return {
        "applications": {
            "versions__delta": str(version),
            "apps__hashcode": apps_hashcode(leases),
            "application": [_application(name, group) for name, group in by_app.items()],
        }
    }


def prefers_xml(accept: str | None) -> bool:
    """False only when the client asks for JSON at least as much as for XML.

    Eureka answers XML to a client that states no preference (no ``Accept``, or a bare
    ``*/*``), and py-eureka-client depends on it: it sends no ``Accept`` and parses only
    XML. Spring's client and the platform's ``RegistryClient`` ask for JSON explicitly.
    """
    if not accept:
        return True
    json_q: float | None = None
    xml_q: float | None = None
    wildcard_q: float | None = None
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media == "application/json":
            json_q = max(json_q or 0.0, q)
        elif media in ("application/xml", "text/xml"):
            xml_q = max(xml_q or 0.0, q)
        elif media in ("*/*", "application/*"):
            wildcard_q = max(wildcard_q or 0.0, q)
    for_json = json_q if json_q is not None else (wildcard_q or 0.0)
    for_xml = xml_q if xml_q is not None else (wildcard_q or 0.0)
    if for_xml != for_json:
        return for_xml > for_json
    return not (json_q is not None and json_q > 0)


def _tag(name: str) -> str:
    name = _XML_NAMES.get(name, name)
    tag = _NOT_NAME_CHAR.sub("_", name) or "_"
    return tag if tag[0].isalpha() or tag[0] == "_" else f"_{tag}"


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _element(name: str, value: Any) -> ElementTree.Element:
    element = ElementTree.Element(_tag(name))
    if isinstance(value, Mapping):
        for key, child in value.items():
            key = str(key)
            if key.startswith("@"):
                element.set(_tag(key[1:]), _text(child))
            elif key == "$":
                element.text = _text(child)
            elif isinstance(child, list):
                element.extend(_element(key, item) for item in child)
            else:
                element.append(_element(key, child))
    elif isinstance(value, list):
        element.extend(_element(name, item) for item in value)
    elif value is not None:
        element.text = _text(value)
    return element


def to_xml(document: Mapping[str, Any]) -> str:
    """A one-rooted document (``{"applications": {...}}``) as Eureka's XML."""
    ((root, value),) = document.items()
    return ElementTree.tostring(_element(root, value), encoding="unicode")


def _from_element(element: ElementTree.Element) -> Any:
    children = list(element)
    text = (element.text or "").strip()
    if not children and not element.attrib:
        return text or None
    value: dict[str, Any] = {f"@{k}": v for k, v in element.attrib.items()}
    if text:
        value["$"] = text
    for child in children:
        item = _from_element(child)
        if child.tag in value:
            existing = value[child.tag]
            value[child.tag] = [*existing, item] if isinstance(existing, list) else [existing, item]
        else:
            value[child.tag] = item
    return value


def _xml_too_deep(root: ElementTree.Element) -> bool:
    pending = [(root, 1)]
    while pending:
        element, depth = pending.pop()
        if depth > MAX_DEPTH:
            return True
        pending.extend((child, depth + 1) for child in element)
    return False


def _json_too_deep(document: Any) -> bool:
    pending = [(document, 0)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(value, dict):
            pending.extend((child, depth + 1) for child in value.values())
        elif isinstance(value, list):
            pending.extend((child, depth + 1) for child in value)
    return False


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of range")
    return number


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _too_deep() -> UnreadableBody:
    return UnreadableBody(f"The body nests deeper than {MAX_DEPTH} levels.")


def _parse_xml(body: bytes) -> dict[str, Any]:
    # No DTD, no entities: that closes entity expansion, the one XML attack expat still allows.
    # defusedxml refuses them in the parser, whatever the encoding (a byte search missed
    # a UTF-16 body).
    try:
        root: ElementTree.Element = defusedxml.ElementTree.fromstring(body, forbid_dtd=True)
    except defusedxml.DefusedXmlException as exc:
        raise UnreadableBody("XML with a DOCTYPE or entity declarations is not accepted.") from exc
    except ElementTree.ParseError as exc:
        raise UnreadableBody(f"The body is not well-formed XML ({exc}).") from exc
    # _from_element recurses once per level: measure the depth without recursing first.
    if _xml_too_deep(root):
        raise _too_deep()
    return {root.tag: _from_element(root)}


def parse_registration(body: bytes, *, content_type: str | None) -> Any:
    """The ``instance`` a client registers, from JSON or XML; ``None`` when it is missing."""
    is_xml = "xml" in (content_type or "").lower() or body.lstrip().startswith(b"<")
    if is_xml:
        document: Any = _parse_xml(body)
    else:
        try:
            document = json.loads(body, parse_float=_finite, parse_constant=_no_constant)
        except RecursionError as exc:
            raise _too_deep() from exc
        # Also bad UTF-8, NaN, 1e400 and integers too long to convert (all ValueError).
        except ValueError as exc:
            raise UnreadableBody("The body is not valid JSON.") from exc
        if _json_too_deep(document):
            raise _too_deep()
    if not isinstance(document, dict):
        return None
    return document.get("instance")
