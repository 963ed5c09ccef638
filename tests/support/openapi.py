"""What the OpenAPI document's tests share: a task type, an API key, payloads the API
accepts, and a validator of one of the document's components."""

from __future__ import annotations

from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

TYPE = "client.echo"
KEY = "k1"

PAYLOADS_ACCEPTED: list[Any] = [
    {},
    {"a": [1, -2.5, "x", True, None, [], [[["deep"]]], {"k": ["v", {"w": [None]}]}]},
    {"\U0001f600": "\U0001f600", "": ""},
]


def schema_validator(document: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    """A validator of component ``name`` that resolves the document's references."""
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource("urn:taskq", resource)
    schema = {"$ref": f"urn:taskq#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)
