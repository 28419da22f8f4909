"""The one place where errors become HTTP responses with an OpenAI-style JSON body.

Every error the server answers has the body ``{"error": {"message", "type", "param", "code"}}``.
:class:`APIError` is what the server raises for what it checks itself (limits, unknown names);
:func:`status_of` maps the engine's exceptions (:class:`~personacore.PersonacoreError` subclasses,
docs/architecture.md "Values are checked once") to a status: the caller's fault is a 4xx, the
engine's a 5xx. :func:`install` registers the handlers on an app, so that no request, however bad,
ends in anything but a JSON error (the server never dies on a bad request).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Type

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    ChatTemplateError,
    ComputeError,
    InternalError,
    InvalidInputError,
    ModelNotFoundError,
    PersonacoreError,
    TokenizerError,
)

__all__ = [
    "APIError",
    "error_body",
    "error_response",
    "install",
    "status_of",
    "validation_error",
]

_LOG = logging.getLogger("personacore.serve")

#: engine exception class -> (HTTP status, OpenAI error type); the first match in MRO order wins
_ENGINE_STATUS: Dict[Type[BaseException], Tuple[int, str]] = {
    InvalidInputError: (400, "invalid_request_error"),
    ChatTemplateError: (400, "invalid_request_error"),
    TokenizerError: (400, "invalid_request_error"),
    ModelNotFoundError: (404, "not_found_error"),
    ComputeError: (500, "server_error"),
    InternalError: (500, "server_error"),
}

_TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    """An error the server answers as ``status`` with an OpenAI error body.

    ``code`` is a short machine-readable reason (``"context_length_exceeded"``,
    ``"vector_not_found"``...), ``param`` the request field at fault.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: Optional[str] = None,
        param: Optional[str] = None,
        type: Optional[str] = None,  # noqa: A002 - the OpenAI field name
        headers: Optional[Mapping[str, str]] = None,
    ):
        """See the class docstring."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPE_OF_STATUS.get(status, "server_error")
        self.headers = headers

    @classmethod
    def from_exception(cls, exc: BaseException) -> "APIError":
        """The APIError for any exception: itself, an engine error by :func:`status_of`, else a 500."""
        if isinstance(exc, APIError):
            return exc
        status, kind = status_of(exc)
        message = str(exc) if status < 500 else f"{type(exc).__name__}: {exc}"
        return cls(status, message, type=kind, code=type(exc).__name__)


def status_of(exc: BaseException) -> Tuple[int, str]:
    """(HTTP status, OpenAI error type) of an exception raised by the engine or the layers below."""
    for klass in type(exc).__mro__:
        if klass in _ENGINE_STATUS:
            return _ENGINE_STATUS[klass]
    if isinstance(exc, PersonacoreError) and isinstance(exc, ValueError):
        return 400, "invalid_request_error"  # other value errors of the layers below
    return 500, "server_error"


def error_body(err: APIError) -> Dict[str, Any]:
    """The JSON body of an error: ``{"error": {"message", "type", "param", "code"}}``."""
    return {
        "error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    }


def error_response(err: APIError) -> JSONResponse:
    """The response for an error (its status, its headers, the OpenAI body)."""
    if err.status >= 500:
        _LOG.error("request failed: %s", err.message)
    return JSONResponse(error_body(err), status_code=err.status, headers=dict(err.headers or {}))


def validation_error(errors: Sequence[Any]) -> APIError:
    """Body errors (pydantic's or FastAPI's: bad JSON, wrong types) as one 400 naming the first field."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = ".".join(loc) or None
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
        for e in errors[:5]
    )
    return APIError(400, f"invalid request: {detail}", code="invalid_request", param=param)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into an OpenAI-style JSON error."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(APIError.from_exception(exc))

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error(exc.errors()))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    async def on_any(request: Request, exc: Exception) -> JSONResponse:
        _LOG.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError.from_exception(exc))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(PersonacoreError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_any)
