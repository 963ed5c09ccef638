"""/openapi.json, without services: valid OpenAPI 3.1 and JSON Schema, and its free-form
JSON (payloads, results) says exactly what the API's validation accepts. A client
generated from it is used against the running API in ``tests/integration``."""

from __future__ import annotations

import uuid
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from taskq.enqueue.validation import InvalidRequest, enqueue_task
from taskq.web.openapi import openapi_document
from tests.support.openapi import KEY, PAYLOADS_ACCEPTED, TYPE, schema_validator
from tests.support.services import make_settings

PAYLOADS_REFUSED: list[Any] = [
    [],
    "x",
    None,
    {"s": "x\x00"},
    {"k\x00": 1},
    {"a": ["x\x00"]},
    {"a": [["x", "\x00"]]},
    {"a": [{"k\x00": 1}]},
    {"a": {"b": [1, {"c": ["\x00"]}]}},
]


@pytest.mark.parametrize("overrides", [{}, {"api_keys": KEY, "queues": "fast,slow"}])
def test_the_document_is_valid_and_says_what_the_api_accepts(overrides: dict[str, str]) -> None:
    settings = make_settings(**overrides)
    document = openapi_document(settings)
    validate(document)  # OpenAPI 3.1
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    # Payloads and results are free-form JSON in a form generators read (no union that
    # recurses into itself); the document still says all that validation checks.
    request = schema_validator(document, "EnqueueRequest")
    for payload in PAYLOADS_ACCEPTED + PAYLOADS_REFUSED:
        body = {"type": TYPE, "payload": payload}
        try:
            enqueue_task(body, settings)
            accepted = True
        except InvalidRequest:
            accepted = False
        assert accepted == (payload in PAYLOADS_ACCEPTED), payload
        assert request.is_valid(body) == accepted, payload
    # A task's answer carries its payload and its result, any JSON value.
    task = schema_validator(document, "Task")
    answer = {
        "id": str(uuid.uuid4()),
        "type": TYPE,
        "queue": "default",
        "status": "SUCCEEDED",
        "attempts": 1,
        "max_attempts": 5,
        "run_at": "2030-01-01T00:00:00+00:00",
        "created_at": "2030-01-01T00:00:00+00:00",
        "payload": PAYLOADS_ACCEPTED[1],
        "last_error": None,
    }
    results: list[Any] = [None, 1, "x", [1, ["y"]], {"z": [{}]}]
    for result in results:
        assert task.is_valid({**answer, "result": result}), result
    refused: list[Any] = ["\x00", [["\x00"]], {"\x00": 1}]
    for result in refused:
        assert not task.is_valid({**answer, "result": result}), result
