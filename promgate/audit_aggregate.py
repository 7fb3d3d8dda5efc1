"""Fold floods of refusals from peers that established no identity into counted records.

A peer that holds no credential can open connections that fail the TLS handshake (no
certificate, plain HTTP on a TLS port, a handshake never finished) as fast as it likes; one
audit record each would fill the disk, and with ``on_failure: deny`` a full disk stops every
scrape. :class:`AggregatingSink` sits between the listeners and the audit log and passes every
record through unchanged, except those :func:`aggregation_key` names:

- the first such record of a key (event, reason, peer address prefix: IPv4 /24, IPv6 /64) is
  written at once, exact peer and all, with ``count: 1``;
- later ones within ``interval`` seconds (on the injected clock) are only counted; when the
  interval ends, one record stands for them all: the same event and reason, ``peer`` the
  prefix (``203.0.113.0/24``), ``count`` how many it stands for. A key that had more failures
  is held for another interval, so a steady flood writes one record per key per interval; a
  key that had none is forgotten, and its next failure is written at once again;
- at most ``max_keys`` keys are held; failures of further keys are counted under one overflow
  key per event and reason (``peer`` absent), never written at once, so that a flood from
  many source addresses still writes a bounded number of records;
- :meth:`AggregatingSink.flush` (called when the gateway stops, before the audit log's
  ``stop`` record) writes every pending count.

The sum of ``count`` over these records is the number of refusals, which is what the
metrics count too. The records are ordinary chained records: ``audit verify`` checks them
like any other.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from promgate.addresses import peer_prefix
from promgate.audit import AuditEvent, IAuditSink

#: How many distinct keys are held before further ones fall into the overflow key.
MAX_KEYS = 4096
#: ``connection`` records of tcp listeners refused before any TLS, route or identity.
_CONNECTION_REASONS = frozenset(
    {
        "not_tls",
        "plain_http",
        "sslv2",
        "malformed_client_hello",
        "client_hello_timeout",
        "closed_before_client_hello",
    }
)

Key = tuple[str, str, str]  # (event, reason, peer prefix); prefix "" is the overflow key


def aggregation_key(event: AuditEvent) -> Key | None:
    """The key a record is counted under, or None if it is written as it is.

    Aggregated: every ``tls_handshake_failed`` record (the peer established no identity:
    a certificate it presented was refused, so it names nobody), and the ``connection``
    records of tcp listeners refused before a ClientHello was read (reasons
    ``not_tls``, ``plain_http``, ``sslv2``, ``malformed_client_hello``,
    ``client_hello_timeout``, ``closed_before_client_hello``). Everything else, every
    ``request`` record included, is written as it is.
    """
    if event.count is not None:
        return None
    if event.event == "tls_handshake_failed":
        pass
    elif not (
        event.event == "connection"
        and event.reason in _CONNECTION_REASONS
        and event.identity is None
        and event.route is None
    ):
        return None
    return (event.event, event.reason or "", peer_prefix(event.peer))


@attrs.define
class _Window:
    """One key's current interval: what its summary record will say."""

    listener: str | None
    count: int = 0
    several_listeners: bool = False
    timer: IDelayedCall | None = None


@implementer(IAuditSink)
class AggregatingSink(Service):
    """An audit sink in front of another, folding unauthenticated refusals (see module).

    ``on_aggregated()`` is called for each record counted rather than written (for
    ``promgate_audit_records_aggregated_total``).
    """

    def __init__(
        self,
        sink: IAuditSink,
        clock: IReactorTime,
        interval: float = 10.0,
        *,
        max_keys: int = MAX_KEYS,
        on_aggregated: Callable[[], None] | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        self._sink = sink
        self._clock = clock
        self._interval = interval
        self._max_keys = max_keys
        self._on_aggregated = on_aggregated
        self._windows: dict[Key, _Window] = {}

    @property
    def healthy(self) -> bool:
        """As the audit log behind it."""
        return bool(self._sink.healthy)

    @property
    def held(self) -> int:
        """How many keys are held now (overflow keys included)."""
        return len(self._windows)

    def record(self, event: AuditEvent) -> bool:
        """Write ``event``, or count it into its key's window."""
        key = aggregation_key(event)
        if key is None:
            return bool(self._sink.record(event))
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= self._max_keys:
                key = (key[0], key[1], "")
                window = self._windows.get(key)
                if window is None:
                    # The overflow key is never written at once: it has no first record.
                    window = self._open(key, event.listener)
            else:
                self._open(key, event.listener)
                return bool(self._sink.record(attrs.evolve(event, count=1)))
        window.count += 1
        if event.listener != window.listener:
            window.several_listeners = True
        if self._on_aggregated is not None:
            self._on_aggregated()
        return bool(self._sink.healthy)

    def flush(self) -> None:
        """Write every pending count now and forget every key."""
        windows, self._windows = self._windows, {}
        for key, window in windows.items():
            if window.timer is not None and window.timer.active():
                window.timer.cancel()
            self._summarise(key, window)

    def stopService(self) -> None:
        """The gateway stops: flush, before the audit log writes ``stop``."""
        self.flush()
        Service.stopService(self)

    # -- internals ---------------------------------------------------------------------------

    def _open(self, key: Key, listener: str | None) -> _Window:
        window = self._windows[key] = _Window(listener)
        window.timer = self._clock.callLater(self._interval, self._close, key)
        return window

    def _close(self, key: Key) -> None:
        window = self._windows.get(key)
        if window is None:
            return
        if not window.count:
            del self._windows[key]
            return
        self._summarise(key, window)
        # Still flooding: stay held, so the next failure is counted, not written at once.
        window.count = 0
        window.several_listeners = False
        window.timer = self._clock.callLater(self._interval, self._close, key)

    def _summarise(self, key: Key, window: _Window) -> None:
        if not window.count:
            return
        event, reason, prefix = key
        if prefix:
            detail = f"{window.count} more from {prefix} within {self._interval:g}s"
        else:
            detail = (
                f"{window.count} more from peers beyond the {self._max_keys} prefixes held, "
                f"within {self._interval:g}s"
            )
        if window.several_listeners:
            detail += " on several listeners"
        self._sink.record(
            AuditEvent(
                event=event,
                listener=None if window.several_listeners else window.listener,
                peer=prefix or None,
                decision="deny",
                reason=reason,
                detail=detail,
                count=window.count,
            )
        )


__all__ = ["MAX_KEYS", "AggregatingSink", "aggregation_key", "peer_prefix"]
