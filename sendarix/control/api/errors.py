"""The API's one error shape: ``{"error": {"code", "message"}}`` with an HTTP status.

Codes are snake_case and stable (clients branch on them); messages are for people and
name the field or limit involved.
"""

from __future__ import annotations

import json
from typing import Any


class ApiError(Exception):
    """An answer other than success: ``status``, a stable ``code`` and a message."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> bytes:
    return json_bytes({"error": {"code": code, "message": message}})


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def invalid(field: str, why: str) -> ApiError:
    """400 ``invalid_request`` naming the field."""
    return ApiError(400, "invalid_request", f"{field}: {why}")


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


UNAUTHORIZED = ApiError(
    401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key>)",
    {"WWW-Authenticate": 'Bearer realm="sendarix"'},
)
STORE_UNAVAILABLE = ApiError(
    503, "store_unavailable", "the stores do not answer; try again shortly", {"Retry-After": "5"}
)
