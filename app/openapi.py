"""`GET /openapi.json`: the HTTP API as an OpenAPI 3.1 document.

Built once per app from the same pydantic models that validate the bodies, so the
document cannot drift from what the server accepts; the list of operations below is the
README's API table.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .apikey_schemas import ApiKeyGrant
from .dialects.anthropic import MessagesRequest
from .dialects.openai import ChatCompletionRequest
from .schemas import CompletionRequest, DevTokenGrant, Feedback, RefreshBody, TokenGrant

_MODELS: tuple[type[BaseModel], ...] = (
    CompletionRequest,
    Feedback,
    TokenGrant,
    DevTokenGrant,
    RefreshBody,
    ApiKeyGrant,
    ChatCompletionRequest,
    MessagesRequest,
)

# (method, path, summary, request body model, success status, success media type)
_OPERATIONS: tuple[tuple[str, str, str, type[BaseModel] | None, int, str], ...] = (
    ("post", "/v1/streams", "Start a resumable generation", CompletionRequest, 201, "json"),
    ("get", "/v1/streams/{stream_id}/events", "The stream's events (SSE)", None, 200, "sse"),
    ("get", "/v1/events", "Many streams' events on one connection (SSE)", None, 200, "sse"),
    ("get", "/v1/streams/{stream_id}", "Status, text so far, usage", None, 200, "json"),
    ("delete", "/v1/streams/{stream_id}", "Cancel a stream", None, 202, "json"),
    ("post", "/v1/streams/{stream_id}/ticket", "A fresh stream ticket", None, 200, "json"),
    ("post", "/v1/streams/{stream_id}/feedback", "Judge an answer", Feedback, 200, "json"),
    (
        "post",
        "/v1/chat/stream",
        "Generate, streamed in the response",
        CompletionRequest,
        200,
        "sse",
    ),
    (
        "post",
        "/v1/chat/completions",
        "OpenAI's Chat Completions API (SSE with stream: true)",
        ChatCompletionRequest,
        200,
        "json",
    ),
    (
        "post",
        "/v1/messages",
        "Anthropic's Messages API (SSE with stream: true)",
        MessagesRequest,
        200,
        "json",
    ),
    ("get", "/v1/models", "Models the caller's plan may use", None, 200, "json"),
    ("get", "/v1/usage", "The caller's limits, used and remaining", None, 200, "json"),
    ("post", "/v1/auth/token", "Tokens for a subject (trusted backend)", TokenGrant, 200, "json"),
    ("post", "/v1/auth/refresh", "Rotate a refresh token", RefreshBody, 200, "json"),
    ("post", "/v1/auth/logout", "Revoke a refresh token's family", RefreshBody, 204, "json"),
    ("post", "/v1/auth/dev-token", "Tokens in development mode", DevTokenGrant, 200, "json"),
    ("post", "/v1/admin/plans/reload", "Reload plans from the config file", None, 200, "json"),
    ("post", "/v1/admin/apikeys", "Create an API key (shown once)", ApiKeyGrant, 201, "json"),
    ("get", "/v1/admin/apikeys", "List API keys (never the keys)", None, 200, "json"),
    ("delete", "/v1/admin/apikeys/{key_id}", "Revoke an API key", None, 200, "json"),
    ("get", "/healthz", "Liveness", None, 200, "json"),
    ("get", "/readyz", "Readiness", None, 200, "json"),
    ("get", "/metrics", "Prometheus metrics", None, 200, "text"),
)

_MEDIA = {"json": "application/json", "sse": "text/event-stream", "text": "text/plain"}
_PROBLEM = {"$ref": "#/components/schemas/Problem"}


def document(version: str, paths: set[str]) -> dict[str, Any]:
    """The document for the routes this app has (`paths`: the auth routes exist only in
    some configurations)."""
    _, defs = models_json_schema(
        [(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    schemas["Problem"] = {
        "type": "object",
        "description": "RFC 9457 problem details; `code` is stable.",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "code": {"type": "string"},
        },
        "required": ["type", "title", "status", "detail", "code"],
    }
    out: dict[str, Any] = {}
    for method, path, summary, body, status, media in _OPERATIONS:
        if path not in paths:
            continue
        operation: dict[str, Any] = {
            "summary": summary,
            "responses": {
                str(status): {"description": "success", "content": {_MEDIA[media]: {}}},
                "4XX": {
                    "description": "refused",
                    "content": {"application/problem+json": {"schema": _PROBLEM}},
                },
            },
        }
        if "{key_id}" in path:
            operation["parameters"] = [
                {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ]
        if "{stream_id}" in path:
            operation["parameters"] = [
                {"name": "stream_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ]
        if body is not None:
            operation["requestBody"] = {
                "required": body is not RefreshBody and body is not DevTokenGrant,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{body.__name__}"}
                    }
                },
            }
        out.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "sserelay", "version": version},
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": out,
    }


def route(version: str, paths: set[str]) -> Any:
    body = document(version, paths)

    async def openapi(request: Request) -> Response:
        return JSONResponse(body)

    return openapi
