"""The app's own /openapi.json: what this server accepts, from the pydantic request models.

The routes read their bodies themselves (for the body limit, depth and encoding checks and
OpenAI-shaped errors, serving/openai_adapter.py), so FastAPI cannot see the request models; this
puts them back: each POST route's request body is its model's JSON schema, /v1/models answers a
ModelList, errors are OpenAI error JSON, and `x-unsupported-parameters` lists the fields of the
OpenAI spec that are accepted by name but refused when set (serving/openai_schema.UNSUPPORTED).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from serving.openai_schema import (
    UNSUPPORTED,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)

REF = "#/components/schemas/{model}"
BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
ERROR_STATUSES = ("400", "401", "404", "413", "429", "500", "503")


def build(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    models = [(m, "validation") for m in BODIES.values()]
    models += [(m, "serialization") for m in (ModelList, ModelCard, ErrorResponse)]
    _, defs = models_json_schema(models, ref_template=REF)
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    error = {
        "description": "OpenAI error JSON",
        "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}},
    }
    for path, ops in doc["paths"].items():
        for op in ops.values():
            op["responses"].pop("422", None)  # FastAPI's validation error: never sent here
            if path.startswith("/v1/"):
                op["responses"].update(dict.fromkeys(ERROR_STATUSES, error))
    for name in ("HTTPValidationError", "ValidationError"):
        doc["components"]["schemas"].pop(name, None)
    for path, model in BODIES.items():
        ref = {"$ref": REF.format(model=model.__name__)}
        op = doc["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
        op["responses"]["200"] = {
            "description": "the response JSON, or with `stream` server-sent events",
            "content": {"application/json": {"schema": {}}, "text/event-stream": {"schema": {}}},
        }
    listing = {"application/json": {"schema": {"$ref": REF.format(model="ModelList")}}}
    doc["paths"]["/v1/models"]["get"]["responses"]["200"]["content"] = listing
    doc["x-unsupported-parameters"] = dict(UNSUPPORTED)
    return doc


def install(app: FastAPI) -> None:
    """Serve `build(app)` at app.openapi_url (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi
