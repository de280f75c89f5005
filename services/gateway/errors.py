"""OpenAI-style error bodies: every failure the API reports has this shape, so the official
clients raise their typed exceptions (BadRequestError, AuthenticationError, ...)."""

from __future__ import annotations

from typing import Any

from aiohttp import web


class APIError(Exception):
    """An error answered to the client as {"error": {message, type, param, code}}."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        headers = None
        if self.status in RETRYABLE:
            # Both mean "not now": say when to come back, as OpenAI's rate limits do; the
            # official clients honour Retry-After in their retry backoff.
            headers = {"Retry-After": str(RETRY_AFTER_S)}
        return web.json_response(self.body(), status=self.status, headers=headers)


RETRYABLE = (429, 503)
RETRY_AFTER_S = 1  # seconds: an executor reconnects or a slot frees within about that


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 for a request the client must fix."""
    return APIError(message, param=param, code=code)
