"""RFC 9457 problem details: the one error format of every Shop answer (SPEC §6)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from starlette.responses import Response
from starlette.types import Send

from shop.platform.context import current_request_id, current_trace

__all__ = [
    "PROBLEM_JSON",
    "PROBLEM_SCHEMA",
    "Problem",
    "documented_problem",
    "problem_body",
    "problem_response",
    "send_problem",
    "validation_errors",
]

PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "https://shop.dev/problems/"

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; some problems add members (e.g. shortages).",
    "type": "object",
    "required": ["type", "title", "status", "detail", "instance"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "requestId": {"type": ["string", "null"]},
        "traceId": {"type": ["string", "null"]},
        "errors": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
"""The JSON schema of every error body, as the OpenAPI documents name it (``Problem``)."""


def documented_problem(description: str) -> dict[str, Any]:
    """An OpenAPI response whose body is a problem (``components/schemas/Problem``)."""
    return {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


class Problem(Exception):
    """Raise anywhere in a request to answer with a problem+json body."""

    def __init__(
        self,
        status: int,
        detail: str | None = None,
        *,
        title: str | None = None,
        type_: str | None = None,
        errors: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail or title or str(status))
        self.status = status
        self.detail = detail
        self.title = title
        self.type_ = type_
        self.errors = dict(errors) if errors else None
        self.headers = dict(headers) if headers else {}
        self.extra = dict(extra) if extra else {}


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_body(
    status: int,
    *,
    instance: str,
    detail: str | None = None,
    title: str | None = None,
    type_: str | None = None,
    errors: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    title = title or _title(status)
    trace = current_trace()
    body: dict[str, Any] = {
        "type": type_ or _TYPE_BASE + title.lower().replace(" ", "-"),
        "title": title,
        "status": status,
        "detail": detail or title,
        "instance": instance,
        "requestId": current_request_id(),
        "traceId": trace.trace_id if trace else None,
    }
    if errors is not None:
        body["errors"] = dict(errors)
    if extra:
        body.update({k: v for k, v in extra.items() if k not in body})
    return body


def problem_response(
    status: int,
    *,
    instance: str,
    detail: str | None = None,
    title: str | None = None,
    type_: str | None = None,
    errors: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = problem_body(
        status,
        instance=instance,
        detail=detail,
        title=title,
        type_=type_,
        errors=errors,
        extra=extra,
    )
    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=dict(headers) if headers else None,
    )


def from_problem(problem: Problem, *, instance: str) -> Response:
    return problem_response(
        problem.status,
        instance=instance,
        detail=problem.detail,
        title=problem.title,
        type_=problem.type_,
        errors=problem.errors,
        extra=problem.extra,
        headers=problem.headers,
    )


async def send_problem(
    send: Send,
    status: int,
    *,
    instance: str,
    detail: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer from plain ASGI code (middleware, the gateway) with a problem body."""
    body = json.dumps(
        problem_body(status, instance=instance, detail=detail), separators=(",", ":")
    ).encode()
    raw_headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def validation_errors(errors: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Pydantic/FastAPI error list → ``{"field.path": "message"}``, first message per field."""
    out: dict[str, str] = {}
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        if loc and loc[0] in {"body", "query", "path", "header", "cookie"} and len(loc) > 1:
            loc = loc[1:]
        field = ".".join(loc) or "body"
        message = str(error.get("msg", "is invalid"))
        if error.get("type") == "json_invalid":
            field, message = "body", "is not valid JSON"
        out.setdefault(field, message)
    return out
