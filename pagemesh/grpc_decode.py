"""A request that does not parse as its message gets INVALID_ARGUMENT from every pagemesh gRPC
server, as any other bad input does.

grpc.aio decodes a request before the handler runs, and a DecodeError there surfaces as UNKNOWN
("Unexpected error in RPC handling"), which says nothing to the caller and reads like a server
fault. This interceptor gives each method a decoder that hands the handler a marker instead of
raising, and a handler that answers INVALID_ARGUMENT for it (for streamed requests, at the first
bad message)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class _Undecodable:
    """Stands in for a request that did not parse."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _message(bad: _Undecodable) -> str:
    return f"the request does not parse as its message: {bad.error}"


def _safe(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return _Undecodable(exc)

    return decode


async def _refuse_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(request))


async def _checked(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    async for request in requests:
        await _refuse_undecodable(request, context)
        yield request


def _wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    if handler.request_deserializer is None:
        return handler
    decode = _safe(handler.request_deserializer)
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await _refuse_undecodable(request, context)
            return await inner_uu(request, context)

        return handler._replace(request_deserializer=decode, unary_unary=unary_unary)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], ctx: grpc.aio.ServicerContext) -> Any:
            return await inner_su(_checked(requests, ctx), ctx)

        return handler._replace(request_deserializer=decode, stream_unary=stream_unary)
    if handler.unary_stream is not None:
        return handler._replace(
            request_deserializer=decode, unary_stream=_unary_stream(handler.unary_stream)
        )
    return handler._replace(
        request_deserializer=decode, stream_stream=_stream_stream(handler.stream_stream)
    )


# Streamed replies: a handler is either an async generator or a coroutine that writes with
# context.write (grpc.aio allows either, never both): the wrapper is of the same kind. The two
# kinds have their own names: mypy refuses one name defined with two signatures in an if's
# branches.
def _unary_stream(inner: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(inner):

        async def replies(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await _refuse_undecodable(request, context)
            async for reply in inner(request, context):
                yield reply

        return replies

    async def writes(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _refuse_undecodable(request, context)
        return await inner(request, context)

    return writes


def _stream_stream(inner: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(inner):

        async def replies(
            requests: AsyncIterator[Any], ctx: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async for reply in inner(_checked(requests, ctx), ctx):
                yield reply

        return replies

    async def writes(requests: AsyncIterator[Any], ctx: grpc.aio.ServicerContext) -> Any:
        return await inner(_checked(requests, ctx), ctx)

    return writes


class DecodeErrorsAsInvalidArgument(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        return handler if handler is None else _wrap(handler)
