"""Connection deadlines for `serve`'s HTTP side: uvicorn's HTTP/1.1 protocol with a header deadline.

uvicorn closes a connection that stays idle after a response (`timeout_keep_alive`), but not one that never sends a
request, or sends its head a byte at a time: such connections count against `--max-connections` for as long as the
client likes, and enough of them answer every request, health checks included, with 503. Here a connection must
deliver a complete request head within `header_timeout_s` of opening (or of its previous response); one that does
not is closed. A request whose head arrived is the app's to bound (its body deadline, `--timeout-s`).
"""

from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol


def deadline_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol class, closing connections whose request head is not complete within
    `header_timeout_s` seconds (pass it as uvicorn's `http`)."""

    class HeaderDeadline(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            self._cancel_header_deadline()
            self.header_deadline = self.loop.call_later(header_timeout_s, self._header_deadline_passed)

        def _cancel_header_deadline(self) -> None:
            handle = getattr(self, "header_deadline", None)
            if handle is not None:
                handle.cancel()
                self.header_deadline = None

        def _header_deadline_passed(self) -> None:
            self.header_deadline = None
            waiting = self.cycle is None or self.cycle.response_complete  # no request head since the last answer
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline
