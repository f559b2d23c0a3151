"""Connection-level guards for the HTTP retrieval service: read timeouts, a header size limit and a connection cap.

uvicorn bounds what it can: ``timeout_keep_alive`` closes a connection idle after a response, and its request size
limits for h11 (``h11_max_incomplete_event_size``). It does not bound the rest, which a slow or hostile client can
hold open forever on the httptools protocol the service runs on:

- a connection that sends nothing, or its request line and headers one byte at a time (the keep-alive timer is armed
  only after a response, and any byte received disarms it);
- a request whose body trickles in (no body timeout);
- headers of any size;
- any number of such connections (``limit_concurrency`` answers 503 to *requests* while too many connections are
  open, idle ones included, so slow clients would make it refuse every good request instead).

``guarded_protocol`` returns a subclass of uvicorn's ``HttpToolsProtocol`` that adds exactly those bounds:

- **header timeout**: the request line and headers must be complete within ``header_timeout_s`` of the connection
  opening or of the previous response's end (idle keep-alive time counts; ``timeout_keep_alive`` is shorter);
- **body timeout**: the body must be complete within ``body_timeout_s`` of the headers' end;
- **header size**: request line plus headers over ``max_header_bytes`` are refused with 431;
- **connection cap**: above ``max_connections`` open connections, the connection that has waited longest for a
  request to arrive in full (headers or body still being read, or idle) is closed to make room; when every open
  connection has a request being served, the new connection is closed at once.

A timed-out read is answered ``408`` (a JSON ``{"detail": reason}``, ``Connection: close``) and the connection closed;
each such event is one log line. The ASGI application of a request whose body timed out sees a client disconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("retriever_service")


@dataclass(frozen=True)
class ConnectionLimits:
    """Bounds per connection and on the number of connections (module docstring)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 65536
    max_connections: int = 1024


def _close_with(transport: asyncio.BaseTransport, status: int, reason: str, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    if not transport.is_closing():
        transport.write(head + body)
        transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """A uvicorn ``HttpToolsProtocol`` subclass enforcing ``limits`` (pass it as ``uvicorn.run(..., http=cls)``).

    Each call returns a new class with its own registry of connections, so two servers in one process do not share
    a cap.
    """
    # connections not serving a request (opened, reading one, or idle after a response), oldest first
    waiting: OrderedDict[GuardedProtocol, None] = OrderedDict()
    open_count = [0]

    class GuardedProtocol(HttpToolsProtocol):
        _read_timer: asyncio.TimerHandle | None = None
        _header_bytes = 0

        def _arm(self, seconds: float, what: str) -> None:
            self._disarm()
            self._read_timer = self.loop.call_later(seconds, self._read_timed_out, seconds, what)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _read_timed_out(self, seconds: float, what: str) -> None:
            self._read_timer = None
            log.warning("%s: %s not received within %g s; connection closed", self._peer(), what, seconds)
            if self.cycle is not None and self.cycle.response_started:  # the application answered already
                self.transport.close()
            else:
                _close_with(self.transport, 408, "Request Timeout", f"{what} not received within {seconds:g} s")

        def _peer(self) -> str:
            return "%s:%s" % self.client if self.client else "client"

        def _waiting(self) -> None:
            waiting[self] = None
            waiting.move_to_end(self)

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            open_count[0] += 1
            if open_count[0] > limits.max_connections:
                if waiting:
                    oldest, _ = waiting.popitem(last=False)
                    log.warning("%d connections open (limit %d): closed %s, which has waited longest for a "
                                "request", open_count[0], limits.max_connections, oldest._peer())
                    oldest.transport.abort()
                else:
                    log.warning("%d connections open (limit %d), all serving requests: refused %s",
                                open_count[0], limits.max_connections, self._peer())
                    transport.abort()
                    return
            self._waiting()
            self._header_bytes = 0
            self._arm(limits.header_timeout_s, "request headers")

        def connection_lost(self, exc) -> None:
            open_count[0] -= 1
            waiting.pop(self, None)
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            self._header_bytes = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count_header_bytes(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_header_bytes(len(name) + len(value) + 4)
            super().on_header(name, value)

        def _count_header_bytes(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > limits.max_header_bytes and not self.transport.is_closing():
                log.warning("%s: request line and headers over %d bytes; connection closed", self._peer(),
                            limits.max_header_bytes)
                _close_with(self.transport, 431, "Request Header Fields Too Large",
                            f"request line and headers over {limits.max_header_bytes} bytes")

        def on_headers_complete(self) -> None:
            if self.transport.is_closing():  # refused above (431): start no application for it
                return
            self._arm(limits.body_timeout_s, "request body")
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            if self.transport.is_closing():
                return
            self._disarm()
            waiting.pop(self, None)  # serving a request: not a candidate to close
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._waiting()
                self._arm(limits.header_timeout_s, "request headers")

    return GuardedProtocol
