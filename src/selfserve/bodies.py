"""Total parsing of untrusted request input.

Every JSON body is decoded here, once, straight into the handler's msgspec type with
strict typing (`"2"` is not an integer), after a nesting-depth check (a body nested
deeper than MAX_DEPTH is refused before any recursive decoding). A body that does not
fit its type is reported field by field: every missing required field, every unknown
field and every top-level field of the wrong type or out of its bounds, not only the
first. Instants and dates, in bodies and in query parameters, must lie in a range the
calendar arithmetic can handle (INSTANT_MIN .. INSTANT_MAX); outside it is a 422 naming
the field and the range.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Union, get_args, get_origin

import msgspec
from litestar import Request
from litestar.enums import ParamType
from litestar.params import ParameterKwarg
from litestar.types import Empty

from selfserve.errors import DomainError, FieldError, InvalidInput, humane

# JSON nesting (objects and arrays) allowed in a request body; the deepest body the
# API itself takes is 3 levels (a branch's opening hours), so 32 is generous.
MAX_DEPTH = 32
# Instants and dates accepted anywhere (bodies and query parameters).
INSTANT_MIN = datetime(1970, 1, 1, tzinfo=UTC)
INSTANT_MAX = datetime(2999, 12, 31, 23, 59, 59, tzinfo=UTC)
DATE_MIN, DATE_MAX = INSTANT_MIN.date(), INSTANT_MAX.date()
INSTANT_RANGE = "between 1970-01-01T00:00:00Z and 2999-12-31T23:59:59Z"
DATE_RANGE = "between 1970-01-01 and 2999-12-31"


class BodyTooDeep(DomainError):
    status = 400
    code = "body_too_deep"


class MalformedBody(DomainError):
    status = 400
    code = "malformed_body"


# --- nesting depth -----------------------------------------------------------------


def _depth(value: Any) -> int:
    """Deepest nesting of lists and dicts in a decoded value (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, list | dict):
            deepest = max(deepest, level)
            stack.extend(
                (child, level + 1) for child in (node.values() if isinstance(node, dict) else node)
            )
    return deepest


def check_depth(body: bytes) -> None:
    """Refuse a body nested deeper than MAX_DEPTH, in linear time.

    Counting brackets bounds the depth from above (brackets inside strings count too),
    which settles almost every body at once; only when that bound is over the limit is
    the body decoded without a type (msgspec, in C; it gives up on nesting past a
    thousand levels) and measured."""
    if body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return
    try:
        depth = _depth(msgspec.json.decode(body))
    except RecursionError:
        depth = MAX_DEPTH + 1
    except msgspec.DecodeError:
        raise MalformedBody() from None
    if depth > MAX_DEPTH:
        raise BodyTooDeep(f"The JSON body is nested deeper than {MAX_DEPTH} levels.")


# --- ranges of instants and dates ------------------------------------------------------

_NAIVE_MIN = INSTANT_MIN.replace(tzinfo=None)
_NAIVE_MAX = INSTANT_MAX.replace(tzinfo=None)


def instant_in_range(value: datetime) -> bool:
    """Compare without converting to UTC (which overflows at the calendar's edges)."""
    offset = value.utcoffset() or timedelta(0)
    naive = value.replace(tzinfo=None)
    return (naive - _NAIVE_MIN) - offset >= timedelta(0) and (
        _NAIVE_MAX - naive
    ) + offset >= timedelta(0)


def range_error(field: str, value: Any) -> FieldError | None:
    if isinstance(value, datetime):
        if not instant_in_range(value):
            return FieldError(field, f"must be {INSTANT_RANGE}")
    elif isinstance(value, date) and not DATE_MIN <= value <= DATE_MAX:
        return FieldError(field, f"must be {DATE_RANGE}")
    return None


def _walk(value: Any, path: str) -> Iterator[FieldError]:
    if isinstance(value, date):  # datetime is a date
        error = range_error(path or "body", value)
        if error is not None:
            yield error
    elif isinstance(value, msgspec.Struct):
        for field in msgspec.structs.fields(value):
            name = f"{path}.{field.encode_name}" if path else field.encode_name
            yield from _walk(getattr(value, field.name), name)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _walk(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}" if path else str(key))


def check_ranges(value: Any) -> None:
    errors = list(_walk(value, ""))
    if errors:
        raise InvalidInput(errors=errors)


# --- strict, complete decoding ---------------------------------------------------------

_AT = re.compile(r"^(.*?)(?: - at `\$([^`]*)`)?$", re.DOTALL)


def _split(error: msgspec.ValidationError) -> tuple[str, str]:
    """msgspec's "message - at `$.a[0]`" -> ("message", ".a[0]")."""
    match = _AT.match(str(error))
    assert match is not None  # the pattern matches any text
    return match.group(1), match.group(2) or ""


_UNKNOWN = re.compile(r"unknown field `([^`]+)`")
_MISSING = re.compile(r"^Object missing required field `([^`]+)`$")


def _locate(prefix: str, exc: msgspec.ValidationError) -> FieldError:
    """A FieldError at the path msgspec names (an unknown field: at that field)."""
    message, path = _split(exc)
    unknown = _UNKNOWN.search(message)
    missing = _MISSING.match(message)
    if unknown:
        path = f"{path}.{unknown.group(1)}"
        message = "unknown field"
    elif missing:
        path = f"{path}.{missing.group(1)}"
        message = f"required field `{missing.group(1)}` is missing"
    return FieldError(_join(prefix, path), humane(message))


def _join(prefix: str, path: str) -> str:
    if not path:
        return prefix or "body"
    if not prefix:
        return path.lstrip(".") or "body"
    return prefix + path


def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _struct_types(target: Any) -> list[type[msgspec.Struct]]:
    target = _unwrap(target)
    if isinstance(target, type) and issubclass(target, msgspec.Struct):
        return [target]
    if get_origin(target) in (Union, types.UnionType):
        out = [_unwrap(a) for a in get_args(target)]
        if all(isinstance(a, type) and issubclass(a, msgspec.Struct) for a in out):
            return out
    return []


def _choose(target: Any, raw: dict[str, Any]) -> type[msgspec.Struct] | None:
    """The Struct a raw object is meant as: the only one, or the one its tag names."""
    structs = _struct_types(target)
    if len(structs) == 1:
        return structs[0]
    for struct in structs:
        config = struct.__struct_config__
        if config.tag_field is not None and raw.get(config.tag_field) == config.tag:
            return struct
    return None


def _field_errors(target: Any, raw: Any) -> list[FieldError]:
    """Every top-level problem of an object against its Struct (msgspec stops at one)."""
    if not isinstance(raw, dict):
        return []
    struct = _choose(target, raw)
    if struct is None:
        return []
    config = struct.__struct_config__
    fields = msgspec.structs.fields(struct)
    known = {f.encode_name for f in fields}
    if config.tag_field is not None:
        known.add(config.tag_field)
    errors: list[FieldError] = []
    if config.forbid_unknown_fields:
        errors.extend(FieldError(str(key), "unknown field") for key in raw if str(key) not in known)
    for field in fields:
        if field.encode_name not in raw:
            if field.required:
                errors.append(
                    FieldError(
                        field.encode_name, f"required field `{field.encode_name}` is missing"
                    )
                )
            continue
        try:
            value = msgspec.convert(raw[field.encode_name], field.type, strict=True)
        except msgspec.ValidationError as exc:
            errors.append(_locate(field.encode_name, exc))
            continue
        for error in _walk(value, field.encode_name):
            errors.append(error)
    return errors


def decode_body(body: bytes, target: Any) -> Any:
    """Decode a JSON request body into `target`, strictly and totally."""
    check_depth(body)
    try:
        value = msgspec.json.decode(body, type=target, strict=True)
    except msgspec.ValidationError as exc:
        try:  # typed decoding stops at the first misfit: is the rest well-formed?
            raw = msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise MalformedBody() from None
        errors = _field_errors(target, raw)
        if not errors:
            errors = [_locate("", exc)]
        raise InvalidInput(errors=errors) from None
    except (msgspec.DecodeError, RecursionError):
        raise MalformedBody() from None
    check_ranges(value)
    return value


_BODY_TYPES: dict[int, tuple[object, Any]] = {}


def _body_type(request: Request[Any, Any, Any]) -> Any:
    handler = request.route_handler
    cached = _BODY_TYPES.get(id(handler))
    if cached is None or cached[0] is not handler:
        field = handler.parsed_fn_signature.parameters.get("data")
        cached = _BODY_TYPES[id(handler)] = (handler, field.annotation if field else Any)
    return cached[1]


class StrictRequest(Request[Any, Any, Any]):
    """A Request whose `json()` is the body decoded into the handler's type (see above).

    Litestar then finds the handler's `data` already of its type and passes it through."""

    async def json(self) -> Any:
        if self._json is Empty:
            body = await self.body()
            self._json = decode_body(body or b"null", _body_type(self))
        return self._json


# --- query and path parameters -----------------------------------------------------


def _is_time_type(annotation: Any) -> bool:
    annotation = _unwrap(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_is_time_type(a) for a in get_args(annotation))
    return isinstance(annotation, type) and issubclass(annotation, date)


def _is_scalar(annotation: Any) -> bool:
    annotation = _unwrap(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        return all(_is_scalar(a) for a in get_args(annotation))
    return annotation in (int, str, bool, float, type(None)) or _is_time_type(annotation)


_CONSTRAINTS = ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern")


def _with_constraints(annotation: Any, kwarg: Any) -> Any:
    """The parameter's type with its Parameter(ge=..., ...) bounds as msgspec Meta."""
    meta = {k: v for k in _CONSTRAINTS if (v := getattr(kwarg, k, None)) is not None}
    if not meta:
        return annotation
    inner = _unwrap(annotation)
    parts = get_args(inner) if get_origin(inner) in (Union, types.UnionType) else (inner,)
    try:
        bounded = [p if p is type(None) else Annotated[p, msgspec.Meta(**meta)] for p in parts]
        out: Any = bounded[0]
        for part in bounded[1:]:
            out = Union[out, part]  # noqa: UP007 - built at run time
        msgspec.inspect.type_info(out)  # the constraints fit the type
    except (TypeError, ValueError):
        return annotation
    return out


class _Param(msgspec.Struct, frozen=True):
    path: bool
    name: str
    annotation: Any
    required: bool


_PARAMS: dict[int, tuple[object, list[_Param]]] = {}


def _params(request: Request[Any, Any, Any]) -> list[_Param]:
    handler = request.route_handler
    cached = _PARAMS.get(id(handler))
    if cached is None or cached[0] is not handler:
        found = []
        path_names = {p for path in handler.paths for p in re.findall(r"{(\w+)", path)}
        for name, field in handler.parsed_fn_signature.parameters.items():
            kwarg = field.kwarg_definition
            if name == "data" or not _is_scalar(field.annotation):
                continue
            if isinstance(kwarg, ParameterKwarg):
                if kwarg.param_type not in (ParamType.QUERY, ParamType.PATH):
                    continue
                is_path = kwarg.param_type is ParamType.PATH or name in path_names
            elif kwarg is None:  # a bare parameter: a path parameter or else a query one
                is_path = name in path_names
            else:
                continue
            alias = (kwarg.name if isinstance(kwarg, ParameterKwarg) else None) or name
            required = field.is_required and not field.has_default and not is_path
            found.append(
                _Param(is_path, alias, _with_constraints(field.annotation, kwarg), required)
            )
        cached = _PARAMS[id(handler)] = (handler, found)
    return cached[1]


async def check_parameters(request: Request[Any, Any, Any]) -> None:
    """before_request hook: every query parameter checked at once (all missing and all
    malformed ones listed together), instants and dates within the supported range."""
    errors: list[FieldError] = []
    for param in _params(request):
        source = request.path_params if param.path else request.query_params
        raw = source.get(param.name)
        if raw is None:
            if param.required:
                errors.append(
                    FieldError(param.name, f"required query parameter `{param.name}` is missing")
                )
            continue
        try:
            value = msgspec.convert(raw, param.annotation, strict=False)
        except msgspec.ValidationError as exc:
            errors.append(FieldError(param.name, humane(_split(exc)[0])))
            continue
        error = range_error(param.name, value)
        if error is not None:
            errors.append(error)
    if errors:
        raise InvalidInput(errors=errors)
