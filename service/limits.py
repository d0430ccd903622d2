"""Request limits: body size (``BodySizeLimit``) and JSON nesting depth (``MAX_JSON_DEPTH``).

JSON bodies nested deeper than ``MAX_JSON_DEPTH`` (64) levels are refused with 422 ``invalid_json``
(service/routers/merges.py ``_body``). A merge spec needs about six levels; without a limit, a
1 MiB body of ``[`` made json's recursive parser (or any later recursive walk of the parsed
value, such as ``copy.deepcopy``) raise RecursionError: a plain-text 500 and a reset connection.
``json_depth_exceeds`` walks the parsed value with an explicit stack, so it cannot recurse itself.

Bodies over ``SUBMERGE_MAX_REQUEST_BYTES`` are refused with 413 ``request_too_large``.

A pure ASGI middleware: a declared ``Content-Length`` over the limit is refused without passing the
body to the app; a body without one (chunked transfer encoding) is counted as it streams in and
refused as soon as it passes the limit, so the API never buffers more than the limit.

Before the 413 goes out, the rest of the body is read and thrown away (up to ``DRAIN_BYTES``). A
server that closes a socket with unread bytes in it makes the kernel send a TCP reset, and the
client then sees "connection reset" instead of our 413 (it happened in CI). Past ``DRAIN_BYTES`` we
stop reading and close the connection, so a huge upload cannot keep a worker busy.
"""
from __future__ import annotations

from starlette.responses import JSONResponse

from service.errors import ApiError


DRAIN_BYTES = 16 << 20
MAX_JSON_DEPTH = 64


def json_depth_exceeds(value, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a parsed JSON value nests objects/arrays deeper than ``limit`` (a top-level
    object or array is depth 1; scalars add nothing). Iterative, so any depth is safe to check."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


class RequestTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, "request_too_large", f"request body exceeds the limit of {limit} bytes "
                         "(SUBMERGE_MAX_REQUEST_BYTES)")


class BodySizeLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        for name, value in scope.get("headers") or ():
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                if declared is not None and declared > limit:
                    return await _refuse(limit, scope, receive, send)
                break

        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        received, body_done = 0, False

        async def limited_receive():
            nonlocal received, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    raise RequestTooLarge(limit)
            return message

        try:
            await self.app(scope, limited_receive, tracking_send)
        except RequestTooLarge:
            if started:
                raise
            await _refuse(limit, scope, receive, send, body_done=body_done)


async def _drain(receive) -> bool:
    """Read and drop what is left of the request body; False when it is longer than DRAIN_BYTES."""
    drained = 0
    while drained <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return False  # the client went away
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


async def _refuse(limit: int, scope, receive, send, body_done: bool = False) -> None:
    drained = body_done or await _drain(receive)
    # Keep-alive is safe only when the whole body was consumed; otherwise its rest would be
    # parsed as the next request.
    headers = {} if drained else {"Connection": "close"}
    err = RequestTooLarge(limit)
    await JSONResponse(err.body(), status_code=413, headers=headers)(scope, receive, send)
