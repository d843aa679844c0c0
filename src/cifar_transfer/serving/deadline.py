"""Slow clients cannot hold the service: a request must arrive whole, headers and body, within a
deadline.

uvicorn times out idle keep-alive connections, but not a request that trickles in (one header line
or one body byte a second keeps a connection open for ever, and enough of them exhaust the server).
This protocol starts a clock when a connection opens and again after each response; the clock stops
once the whole request has been read, so a prediction that takes long to compute is never cut off.
When the clock runs out the connection is closed. uvicorn's `limit_concurrency` bounds how many
connections are served at once (503 beyond it).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def with_read_timeout(seconds: float) -> type[H11Protocol]:
    """Uvicorn's h11 protocol, closing a connection whose request has not arrived whole within
    `seconds`."""

    class ReadDeadline(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.read_clock: asyncio.TimerHandle | None = None
            self._start_clock()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
                # the request is in (or the connection is ending): no deadline while computing
                self._stop_clock()

        def on_response_complete(self) -> None:
            # first: a pipelined request that the call below reads whole stops it again
            self._start_clock()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_clock()
            super().connection_lost(exc)

        def _start_clock(self) -> None:
            self._stop_clock()
            self.read_clock = self.loop.call_later(seconds, self._too_slow)

        def _stop_clock(self) -> None:
            if self.read_clock is not None:
                self.read_clock.cancel()
                self.read_clock = None

        def _too_slow(self) -> None:
            self.read_clock = None
            if not self.transport.is_closing():
                self.transport.close()

    return ReadDeadline
