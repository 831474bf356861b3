"""Client-facing errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Everything the API rejects or fails with goes through `ApiError` (or is converted to it by the
handlers in `service/app.py`), so a client never sees a traceback or an HTML page.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        error.update(self.extra)
        return {"error": error}


def shown(value: str, limit: int = 100) -> str:
    """A client's value as an error message repeats it: never a huge path or id echoed back whole."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str = "not_found") -> ApiError:
    return ApiError(404, message, param=param, code=code)


def body_validation_error(error: ValidationError) -> RequestValidationError:
    """A body validated by hand (a multipart form, a request built from another), as FastAPI's own
    validation reports it: the app's handler turns it into the 400 naming the field."""
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_url=False)])
