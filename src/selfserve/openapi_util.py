"""Helpers that document error responses consistently in the OpenAPI schema."""

from __future__ import annotations

from litestar.openapi.datastructures import ResponseSpec

from selfserve.errors import PROBLEM_MEDIA_TYPE, Problem

_DESCRIPTIONS: dict[int, str] = {
    400: "Malformed JSON body (`malformed_body`).",
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

    400 is always documented: it replaces the framework's default 400 schema, which
    is not what this API sends."""
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
