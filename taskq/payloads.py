"""Payload models: a handler's payload and result typed with pydantic, a dataclass or a TypedDict.

A handler whose payload parameter is annotated with a pydantic model, a dataclass
or a ``TypedDict`` receives the parsed object; a return annotated with one (or
with a type holding one, such as ``list[Model]``) is serialised through it. The
:class:`pydantic.TypeAdapter` of each is built once, when the handler is
registered. Handlers whose annotations name no model (``dict``, ``Any``, none)
get no adapter and run exactly as before.

The payload model's JSON Schema becomes the task type's ``payload_schema`` when a
worker registers its types; it carries :data:`GENERATED_KEY`, which tells a
schema a worker wrote from one an operator set with ``PUT /types/{name}`` (a
worker never replaces the latter).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import BaseModel, PydanticSchemaGenerationError, TypeAdapter, ValidationError
from pydantic.errors import PydanticUserError
from pydantic_core import PydanticSerializationError
from typing_extensions import is_typeddict

from taskq.errors import Fail, FieldError, HandlerError, InvalidRequest

# Marks a payload_schema written by a worker from its handler's payload model.
GENERATED_KEY = "x-taskq-generated"
MAX_ERRORS_SHOWN = 3
MAX_MESSAGE_CHARS = 200


@dataclasses.dataclass(frozen=True, slots=True)
class PayloadModel:
    """The adapters of one handler: for its payload, its result, or both.

    Attributes:
        payload: parses the payload (``None``: the handler takes the JSON object).
        result: serialises the result (``None``: the result is stored as returned).
        schema: the payload model's JSON Schema, with :data:`GENERATED_KEY`.
        schema_json: ``schema`` as JSON text, as the registry stores it.
        payload_name: the payload model's name, for the reason a payload fails.
    """

    payload: TypeAdapter[Any] | None
    result: TypeAdapter[Any] | None
    schema: dict[str, Any] | None
    schema_json: str | None
    payload_name: str = ""

    def parse(self, payload: dict[str, Any]) -> Any:
        """The payload as the handler's parameter type.

        Raises:
            Fail: the payload does not validate (the attempt fails for good:
                another attempt gets the same payload), naming the fields.
        """
        if self.payload is None:
            return payload
        try:
            return self.payload.validate_python(payload)
        except ValidationError as exc:
            raise Fail(f"the payload is not a valid {self.payload_name}: {describe(exc)}") from None

    def dump_result(self, result: Any) -> Any:
        """The result as JSON-able values, through the return annotation.

        Raises:
            Fail: it cannot be serialised (a result that is not JSON fails the task).
        """
        if self.result is None:
            return result
        try:
            return self.result.dump_python(result, mode="json", warnings=False)
        except (PydanticSerializationError, ValueError, TypeError) as exc:
            raise Fail(f"the result does not serialise through its annotation: {exc}") from None

    def wrap(self, function: Callable[..., Any], sync: bool) -> Callable[..., Any]:
        """``function`` with its payload parsed and its result serialised."""
        parse, dump = self.parse, self.dump_result
        if sync:

            def run_sync(payload: dict[str, Any], ctx: Any) -> Any:
                return dump(function(parse(payload), ctx))

            run: Callable[..., Any] = run_sync
        else:

            async def run_async(payload: dict[str, Any], ctx: Any) -> Any:
                return dump(await function(parse(payload), ctx))

            run = run_async
        functools.update_wrapper(run, function)
        return run

    def to_payload(self, payload: Any) -> Any:
        """An enqueue's payload as a JSON object: a model instance goes through the adapter."""
        if isinstance(payload, dict) or self.payload is None:
            return to_payload(payload)
        return _dump_payload(self.payload, payload)


def inspect_handler(name: str, function: Callable[..., Any]) -> PayloadModel | None:
    """The adapters ``function``'s annotations ask for, or ``None`` if they name no model.

    Raises:
        HandlerError: an annotation cannot be resolved, or pydantic cannot build
            an adapter or a JSON Schema for it, or the schema is one taskq refuses.
    """
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None  # no signature to read (some builtins): a plain handler
    parameters = list(signature.parameters.values())
    payload_type = (
        _resolve(name, parameters[0].annotation, function, "payload")
        if parameters
        else inspect.Parameter.empty
    )
    result_type = _resolve(name, signature.return_annotation, function, "return")
    payload_model = payload_type if _is_model(_strip(payload_type)) else None
    result_model = result_type if _holds_model(result_type) else None
    if payload_model is None and result_model is None:
        return None
    payload = _adapter(name, payload_model, "payload") if payload_model is not None else None
    result = _adapter(name, result_model, "return") if result_model is not None else None
    schema = None
    if payload is not None:
        schema = payload_schema(name, payload, getattr(function, "__qualname__", name))
    return PayloadModel(
        payload,
        result,
        schema,
        None if schema is None else orjson.dumps(schema).decode(),
        _type_name(payload_model),
    )


def payload_schema(name: str, adapter: TypeAdapter[Any], source: str) -> dict[str, Any]:
    """The JSON Schema of a payload model, checked as ``PUT /types`` checks a schema.

    Raises:
        HandlerError: pydantic cannot describe the model in JSON Schema, or
            taskq would refuse the schema (a pattern RE2 cannot run, ...).
    """
    from taskq.enqueue import schemas  # jsonschema and RE2: only for handlers with models

    try:
        schema = adapter.json_schema(mode="validation")
    except (PydanticUserError, PydanticSchemaGenerationError) as exc:
        raise HandlerError(f"{name}: the payload model has no JSON Schema: {exc}") from None
    if _described(schema).get("type") != "object":
        raise HandlerError(f"{name}: the payload model must describe a JSON object")
    schema[GENERATED_KEY] = f"the payload model of {source}"
    try:
        schemas.check_schema(schema)
    except (schemas.SchemaProblem, RecursionError) as exc:
        raise HandlerError(f"{name}: the payload model's JSON Schema is refused: {exc}") from None
    return schema


def _described(schema: dict[str, Any]) -> Any:
    """The schema a root ``{"$ref": "#/$defs/Name"}`` (a recursive model) stands for."""
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return schema.get("$defs", {}).get(ref.removeprefix("#/$defs/"), {})
    return schema


def describe(error: ValidationError) -> str:
    """The first errors of a validation, each as ``payload.<field>: <message>``."""
    found = error.errors(include_url=False, include_input=False)
    parts = [
        f"payload{_path(item['loc'])}: {_cut(item['msg'])}" for item in found[:MAX_ERRORS_SHOWN]
    ]
    more = len(found) - MAX_ERRORS_SHOWN
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def to_payload(payload: Any) -> Any:
    """An enqueue's payload as a JSON object, whatever model instance it is given as.

    A ``dict`` is returned as it is (validated as every payload is); a pydantic
    model or a dataclass instance is serialised through its own adapter.

    Raises:
        InvalidRequest: naming ``payload``: it does not serialise to a JSON object.
    """
    if isinstance(payload, dict):
        return payload
    if isinstance(payload, BaseModel) or (
        dataclasses.is_dataclass(payload) and not isinstance(payload, type)
    ):
        return _dump_payload(_instance_adapter(type(payload)), payload)
    return payload  # the enqueue's validation names what is wrong with it


def _dump_payload(adapter: TypeAdapter[Any], payload: Any) -> Any:
    try:
        data = adapter.dump_python(payload, mode="json", warnings=False)
    except (PydanticSerializationError, ValueError, TypeError) as exc:
        raise InvalidRequest([FieldError("payload", f"cannot be serialised: {exc}")]) from None
    if not isinstance(data, dict):
        message = f"must serialise to a JSON object, not {type(data).__name__}"
        raise InvalidRequest([FieldError("payload", message)])
    return data


@functools.lru_cache(maxsize=256)
def _instance_adapter(model: type) -> TypeAdapter[Any]:
    return TypeAdapter(model)


def _resolve(name: str, annotation: Any, function: Callable[..., Any], what: str) -> Any:
    """``annotation``, evaluated if it is a string (``from __future__ import annotations``)."""
    if not isinstance(annotation, str):
        return annotation
    target = inspect.unwrap(function)
    if not inspect.isroutine(target) and not isinstance(target, functools.partial):
        target = type(target).__call__
    while isinstance(target, functools.partial):
        target = target.func
    namespace = getattr(target, "__globals__", {})
    try:
        local = dict(inspect.getclosurevars(target).nonlocals)
    except (TypeError, ValueError):
        local = {}
    holder = types.SimpleNamespace(__annotations__={"value": annotation})
    try:
        return typing.get_type_hints(holder, globalns=namespace, localns=local)["value"]
    except Exception as exc:  # NameError, SyntaxError, whatever evaluating it raises
        raise HandlerError(
            f"{name}: cannot resolve the {what} annotation {annotation!r} ({exc}); import"
            " its types at run time, not only under TYPE_CHECKING"
        ) from None


def _strip(annotation: Any) -> Any:
    """``Annotated[X, ...]`` -> ``X``."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    if is_typeddict(annotation):
        return True
    return isinstance(annotation, type) and (
        issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)
    )


def _holds_model(annotation: Any, depth: int = 0) -> bool:
    """Whether ``annotation`` is a model or a type made of one (``list[M]``, ``M | None``)."""
    annotation = _strip(annotation)
    if _is_model(annotation):
        return True
    return depth < 8 and any(_holds_model(a, depth + 1) for a in typing.get_args(annotation))


def _adapter(name: str, annotation: Any, what: str) -> TypeAdapter[Any]:
    try:
        return TypeAdapter(annotation)
    except (PydanticUserError, PydanticSchemaGenerationError, TypeError) as exc:
        raise HandlerError(f"{name}: pydantic cannot use the {what} annotation: {exc}") from None


def _type_name(annotation: Any) -> str:
    return getattr(_strip(annotation), "__name__", str(annotation)) if annotation else ""


def _path(loc: tuple[int | str, ...]) -> str:
    """``.a[0].b`` for the location ``("a", 0, "b")``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"
