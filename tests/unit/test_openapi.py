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


def _walk(node: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        for key, value in node.items():
            yield path + "/" + str(key), key, value
            yield from _walk(value, path + "/" + str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_integer_bounds_are_integers(document: dict[str, Any]) -> None:
    bounds = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
    found = 0
    for where, key, value in _walk(document):
        if key in bounds and isinstance(value, int | float):
            found += 1
            if isinstance(value, float):
                assert not value.is_integer(), f"{where} prints an integer as {value}"
    assert found, "no bounds at all: the walk is broken"
    limit = next(
        p for p in document["paths"]["/v1/branches"]["get"]["parameters"] if p["name"] == "limit"
    )
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, 200)
    # the largest id is the exact bigint limit, not a rounded float
    assert 2**63 - 1 in [v for _, k, v in _walk(document) if k == "maximum"]
    assert 2**63 not in [v for _, k, v in _walk(document) if k == "maximum"]


def test_only_operations_reading_a_json_body_list_a_400(document: dict[str, Any]) -> None:
    with_400 = 0
    for method, path, op in operations(document):
        content = (op.get("requestBody") or {}).get("content", {})
        if "application/json" in content:
            with_400 += 1
            assert "400" in op["responses"], f"{method} {path} reads JSON but lists no 400"
        else:
            assert "400" not in op["responses"], f"{method} {path} lists a 400 without a body"
    assert with_400


def test_phone_fields_show_a_uk_example_beside_the_chinese_one(document: dict[str, Any]) -> None:
    phone_schemas = [
        value
        for where, key, value in _walk(document)
        if key == "phone" and isinstance(value, dict) and "/properties/" in where
    ]
    described = [s for s in phone_schemas if "E.164" in s.get("description", "")]
    assert described, phone_schemas
    for schema in described:
        text = schema["description"] + " ".join(schema.get("examples", []))
        assert "+447" in text, schema
        assert "+86" in text, schema


def test_schedule_availability_is_documented(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    documented = [
        name
        for name, schema in schemas.items()
        if "available" in schema.get("properties", {})
        and schema["properties"]["available"].get("description")
    ]
    assert len(documented) >= 3, documented  # the exception body, the update and the answer


def test_descriptions_promise_only_operations_that_exist(document: dict[str, Any]) -> None:
    paths = {re.sub(r"\{[^}]+\}", "{}", p) for p in document["paths"]}
    live_feeds = {"/v1/branches/{}/live"}  # the WebSocket board: not an OpenAPI operation
    texts = [v for _, k, v in _walk(document) if k in ("description", "summary")]
    for text in texts:
        if not isinstance(text, str):
            continue
        for mentioned in re.findall(r"/v1/[A-Za-z0-9_/{}-]*[A-Za-z0-9_}]", text):
            shape = re.sub(r"\{[^}]+\}", "{}", mentioned)
            if shape in ("/v1/auth", "/v1/auth/"):
                continue
            assert shape in paths | live_feeds, f"{mentioned!r} is promised but not served"
    info = document["info"]["description"].lower()
    assert "not part of this api yet" in info
