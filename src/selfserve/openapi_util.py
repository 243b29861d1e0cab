"""Helpers that document error responses consistently in the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin

from selfserve.catalog.models import MAX_BIGINT
from selfserve.errors import PROBLEM_MEDIA_TYPE, Problem

_DESCRIPTIONS: dict[int, str] = {
    400: "Malformed JSON body (`malformed_body`) or nested too deeply (`body_too_deep`).",
    401: "Missing, invalid, expired or revoked token (`unauthorized`, `invalid_token`).",
    403: "The caller's role may never do this (`forbidden`, `branch_forbidden`); outside "
    "the caller's branches is 404.",
    404: "Not found, or outside the caller's scope (`not_found`).",
    409: "Conflicts with the current state (`conflict`, `already_exists`, `overlapping_shift`).",
    413: "Request body too large (`body_too_large`).",
    422: "Validation failed; see `errors[]` (`validation_error`).",
    429: "Rate limited; see `Retry-After` (`rate_limited`).",
    503: "A dependency is down (`service_unavailable`).",
}


def problems(*statuses: int, **descriptions: str) -> dict[int, ResponseSpec]:
    """Response specs for the given error statuses, each an RFC 9457 problem.

    400 is always listed: it replaces the framework's default 400 schema, which is not
    what this API sends; `polish` drops it again from operations without a JSON body."""
    out: dict[int, ResponseSpec] = {}
    for status in sorted({400, *statuses}):
        text = descriptions.get(f"s{status}", _DESCRIPTIONS.get(status, "Error."))
        out[status] = ResponseSpec(
            data_container=Problem,
            description=text,
            media_type=PROBLEM_MEDIA_TYPE,
            generate_examples=False,
        )
    return out


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _integral_bounds(node: Any) -> None:
    """Litestar writes every Parameter(ge=..., le=...) bound as a float: 200 -> 200.0."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _BOUNDS and isinstance(value, float) and value.is_integer():
                # beyond 2**53 a float is not exact: the one such bound is the bigint limit
                node[key] = MAX_BIGINT if value == float(MAX_BIGINT) else int(value)
            else:
                _integral_bounds(value)
    elif isinstance(node, list):
        for item in node:
            _integral_bounds(item)


def polish(document: dict[str, Any]) -> dict[str, Any]:
    """Finish the generated OpenAPI document (in place; idempotent): integer bounds stay
    integers, and a 400 `malformed_body` is only listed where a JSON body is read."""
    for item in document.get("paths", {}).values():
        for method in _METHODS:
            operation = item.get(method)
            if not isinstance(operation, dict):
                continue
            content = (operation.get("requestBody") or {}).get("content", {})
            if "application/json" not in content:
                operation.get("responses", {}).pop("400", None)
    _integral_bounds(document)
    return document


class PolishedJsonRenderPlugin(JsonRenderPlugin):
    """Serves /schema/openapi.json as `selfserve openapi` writes it."""

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return super().render(request, polish(openapi_schema))
