"""OpenAI-style error bodies: every failure the API reports has this shape, so the official
clients raise their typed exceptions (BadRequestError, AuthenticationError, ...).

What a client reads is written for the client: what failed and whether a retry can help, plus
the request id it also gets in the `x-request-id` header. Internal addresses, gRPC's status and
debug strings and tracebacks go to the logs only, under that same request id (`client_safe`
screens text that comes from another service before it is shown).
"""

from __future__ import annotations

import re
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

    def with_request_id(self, request_id: str) -> APIError:
        """The same error, its message naming the request id (server errors: what a client
        quotes when it reports one, and what the logs are searched by)."""
        if request_id and self.status >= 500 and request_id not in self.message:
            self.message = f"{self.message} (request id {request_id})"
        return self

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


# Server errors a client can see (APIError messages; the SSE error event of a stream that fails
# after its headers went out). Each says what failed and whether to retry.
EXECUTOR_UNAVAILABLE = (
    "The executor serving this request became unavailable and no other executor could"
    " continue it; retry shortly."
)
MIGRATIONS_EXHAUSTED = (
    "The request was moved to another executor {n} times and failed each time; retry shortly."
)
GENERATION_FAILED = "The server had an error while generating the response; retry the request."
INTERNAL_ERROR = "The server had an error while processing your request."

# Text from another service (an executor's refusal of a request) is shown only without anything
# that names the inside of the mesh: addresses, gRPC's vocabulary, Python's tracebacks.
_INTERNAL = re.compile(
    r"(\b\d{1,3}(\.\d{1,3}){3}\b|\[[0-9a-f:]+\]|ipv[46]:|unix:|localhost|grpc|"
    r"StatusCode|debug_error_string|Traceback|File \"|\w+Error:|\w+Exception)",
    re.IGNORECASE,
)


def client_safe(text: str, fallback: str) -> str:
    """`text` when it says nothing about the inside of the mesh, else `fallback`."""
    text = text.strip()
    if not text or len(text) > 500 or _INTERNAL.search(text):
        return fallback
    return text
