"""The committed OpenAPI document is current and every operation is documented.

When the first test fails, the API changed without regenerating the document:
run `selfserve openapi` and commit `openapi/openapi.json`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from litestar.routes import HTTPRoute

from selfserve import cli
from selfserve.app import create_app
from selfserve.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "openapi" / "openapi.json"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return cli.openapi_document()


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in document["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def test_committed_document_is_current() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == cli.render_openapi(), (
        "openapi/openapi.json is stale: run `selfserve openapi` and commit the result"
    )


def test_openapi_command_writes_the_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nested" / "openapi.json"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["openapi", "--output", str(out)])
    assert exit_info.value.code == 0
    assert out.read_text(encoding="utf-8") == cli.render_openapi()
    assert str(out) in capsys.readouterr().out


def test_document_is_openapi_3_1_with_bearer_auth(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    assert document["components"]["securitySchemes"]["BearerToken"]["scheme"] == "bearer"
    assert operations(document)


def test_every_operation_has_summary_tag_and_unique_operation_id(
    document: dict[str, Any],
) -> None:
    seen: dict[str, str] = {}
    tag_names = {t["name"] for t in document.get("tags", [])}
    for method, path, op in operations(document):
        where = f"{method} {path}"
        assert op.get("summary", "").strip(), f"{where} has no summary"
        assert op.get("tags"), f"{where} has no tag"
        assert set(op["tags"]) <= tag_names, f"{where} uses an undeclared tag {op['tags']}"
        op_id = op.get("operationId")
        assert op_id, f"{where} has no operationId"
        assert op_id not in seen, f"{where} reuses operationId {op_id} of {seen[op_id]}"
        seen[op_id] = where


def _schema_path(route_path: str) -> str:
    """`/v1/admin/branches/{branch_id:int}` -> `/v1/admin/branches/{branch_id}`."""
    return re.sub(r"\{(\w+):[^}]+\}", r"{\1}", route_path)


def _handlers_with_body() -> set[tuple[str, str]]:
    app = create_app(Settings(environment="test"))
    found: set[tuple[str, str]] = set()
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            if handler.include_in_schema is False:
                continue
            if "data" in handler.parsed_fn_signature.parameters:
                for method in handler.http_methods:
                    found.add((method.upper(), _schema_path(route.path)))
    return found


def test_every_operation_with_a_body_documents_its_schema(document: dict[str, Any]) -> None:
    with_body = _handlers_with_body()
    assert with_body, "no handler takes a body: the introspection is broken"
    documented = {(method, path): op for method, path, op in operations(document)}
    for key in sorted(with_body):
        assert key in documented, f"{key} takes a body but is not in the document"
        body = documented[key].get("requestBody")
        assert body, f"{key} takes a body but documents no requestBody"
        content = body.get("content", {})
        assert content, f"{key} requestBody has no content"
        for media_type, spec in content.items():
            assert spec.get("schema"), f"{key} requestBody {media_type} has no schema"
    # and no GET claims to take one
    for method, path, op in operations(document):
        if method == "GET":
            assert "requestBody" not in op, f"GET {path} documents a request body"


def test_every_admin_operation_documents_401_and_403(document: dict[str, Any]) -> None:
    admin = [(m, p, op) for m, p, op in operations(document) if p.startswith("/v1/admin")]
    assert admin
    for method, path, op in admin:
        for status in ("401", "403"):
            response = op["responses"].get(status)
            assert response, f"{method} {path} does not document {status}"
            assert PROBLEM in response.get("content", {}), (
                f"{method} {path} {status} is not documented as a problem response"
            )
        assert op.get("security"), f"{method} {path} does not declare its bearer security"
