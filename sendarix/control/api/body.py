"""Reading a request's JSON body: only ``application/json``, only an object."""

from __future__ import annotations

import json
from typing import Any

from sendarix.control.api.errors import ApiError


def json_body(request: Any) -> dict[str, Any]:
    """The request body as a JSON object: 415 when it is not JSON, 400 when it does
    not parse or is not an object."""
    ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    raw = request.content.read() if request.content is not None else b""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return value
