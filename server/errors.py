"""Errors a client gets, in the shape its API speaks: OpenAI's error object, or AUTOMATIC1111's under /sdapi.

Every failure a request can cause becomes an `ApiError` with a status and one clear line; anything else is
logged and answered 500 without a traceback.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger("edgediff.server")

# status -> OpenAI's error "type" (its clients map statuses to exception classes; the type is for people)
_TYPES = {401: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
# status -> the name AUTOMATIC1111's API puts in "error" (it reports the exception class there)
_SDAPI_NAMES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "ContentTooLarge",
    429: "TooManyRequests",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self, path: str = "") -> dict:
        if path.startswith("/sdapi/"):
            name = _SDAPI_NAMES.get(self.status, "HTTPException")
            return {"error": name, "detail": self.message, "body": "", "errors": self.message}
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, path: str = "") -> JSONResponse:
        return JSONResponse(self.body(path), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


async def handle_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response(request.url.path)


async def handle_http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own (no such route, wrong method) in the same shapes as ours."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    error = ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)), code=codes.get(exc.status_code))
    error.headers = dict(exc.headers or {})
    return error.response(request.url.path)


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return ApiError(500, "internal error (the server log has the details)", code="server_error").response(
        request.url.path
    )
