"""A whole gateway in memory: the real assembly on a ``MemoryReactorClock``, no sockets.

:class:`MemoryGateway` builds the gateway from a configuration through
:class:`~promgate.service.GatewayService`, the same assembly ``twistd promgate`` runs,
and starts it on a memory reactor. Requests reach the listeners it bound there over
``twisted.test.iosim``, with real TLS (the gateway's own certificate, key and client CA
from the configuration; client certificates from :class:`~promgate.testing.TestPKI`) and
real HTTP bytes; policy, limits and the audit pipeline are the gateway's own. The
gateway's upstream connections go to :class:`~promgate.testing.upstreams.FakeUpstream`
servers registered per ``host:port``; any other address refuses the connection. Audit
records are kept in memory instead of the audit log file, and time moves only when the
test says so::

    gw = MemoryGateway.from_config_file("promgate.yaml")
    gw.upstream("10.0.0.5:9100", body=b"up 1\\n")
    r = gw.get("/scrape?route=node&target=10.0.0.5%3A9100", identity=pki.client("prometheus"))
    assert (r.status, r.body) == (200, b"up 1\\n")
    gw.audit_records("request")
    gw.stop()
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import attrs
from cryptography import x509
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.protocol import ClientFactory
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from promgate.audit import AuditEvent, IAuditSink, MemoryAuditSink
from promgate.config.loader import load_config
from promgate.config.model import Config, Listener
from promgate.jwks import Fetch, FetchError
from promgate.policy_questions import Answer, question
from promgate.reactors import IGatewayReactor
from promgate.reload import ReloadResult
from promgate.service import GatewayService
from promgate.testing.clients import Response
from promgate.testing.redis import ScriptedRedis
from promgate.testing.upstreams import FakeUpstream, Handler, UpstreamNetwork
from promgate.testing.wire import Collector, address, read_response

__all__ = [
    "Basic",
    "Bearer",
    "BoundListener",
    "MemoryAuditLog",
    "MemoryConnection",
    "MemoryGateway",
    "NoResponseError",
]

#: Where the memory clock starts: 2023-11-14T22:13:20Z (audit times look like times).
START = 1_700_000_000.0
#: Rounds of pumping after which a gateway that is still moving bytes is a bug.
MAX_ROUNDS = 100_000


@attrs.frozen
class Bearer:
    """A bearer token, sent as ``Authorization: Bearer TOKEN`` (``Proxy-Authorization``
    to a forward listener)."""

    token: str


@attrs.frozen
class Basic:
    """A basic-auth user and password."""

    user: str
    password: str

    def header_value(self) -> str:
        import base64

        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()


#: Who the client is: a client certificate as ``(certificate, key)`` paths (what
#: ``TestPKI.client`` returns), a bearer token, a basic-auth user, or nobody.
Credential = tuple[Path, Path] | Bearer | Basic | None


class NoResponseError(AssertionError):
    """The request got no complete response (yet): the upstream holds it, time must
    pass, or the connection ended (``lost`` says how)."""

    def __init__(self, message: str, lost: Failure | None) -> None:
        super().__init__(message)
        self.lost = lost


@implementer(IAuditSink)
class MemoryAuditLog(Service):
    """Stands in for the audit log file: every record in memory, between the log's own
    ``start`` and ``stop`` records. Set ``healthy`` to False to make writes fail."""

    def __init__(self) -> None:
        self.sink = MemoryAuditSink()

    @property
    def events(self) -> list[AuditEvent]:
        return self.sink.events

    @property
    def healthy(self) -> bool:
        return self.sink.healthy

    @healthy.setter
    def healthy(self, value: bool) -> None:
        self.sink.healthy = value

    def record(self, event: AuditEvent) -> bool:
        return self.sink.record(event)

    def startService(self) -> None:
        Service.startService(self)
        self.record(AuditEvent("start"))

    def stopService(self) -> None:
        self.record(AuditEvent("stop"))
        Service.stopService(self)


@attrs.frozen
class BoundListener:
    """A listener as the gateway bound it on the memory reactor."""

    name: str
    factory: Any
    #: ``tcp`` or ``unix``.
    kind: str
    interface: str = ""
    port: int = 0
    path: str = ""


def _no_issuer(url: str) -> Deferred[bytes]:
    """No identity provider is reachable from memory: pass ``fetch_keys`` (a
    :class:`~promgate.testing.TestIssuer`'s ``fetch``) to have one."""
    return fail(FetchError(f"no issuer in memory answers {url}"))


def _run_now(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """bcrypt checks run at once, on the test's thread (a memory reactor has none)."""
    return maybeDeferred(f, *args)


class MemoryConnection:
    """One client connection to a listener of a :class:`MemoryGateway`."""

    def __init__(
        self,
        gateway: MemoryGateway,
        client: Collector,
        wire: Any,
        *,
        host: str,
        auth: tuple[str, str] | None,
    ) -> None:
        self.gateway = gateway
        self.client = client
        self._wire = wire  # the client's transport (TLS, or the iosim transport)
        self._host = host
        self._auth = auth
        self._methods: list[str] = []  # requests sent and not yet answered
        self._read = 0  # bytes of client.data taken by responses already returned

    @property
    def lost(self) -> Failure | None:
        """How the connection ended, once it has."""
        return self.client.lost

    @property
    def server_certificate(self) -> x509.Certificate | None:
        """The certificate the gateway presented on this connection (None without TLS)."""
        get_handle = getattr(self._wire, "getHandle", None)
        if get_handle is None or not hasattr(self._wire, "wrappedProtocol"):
            return None
        cert: x509.Certificate | None = get_handle().get_peer_certificate(as_cryptography=True)
        return cert

    @property
    def received(self) -> bytes:
        """Every byte the client received."""
        return self.client.data

    def write(self, data: bytes) -> None:
        """Send raw bytes, then let the gateway react."""
        self._wire.write(data)
        self.gateway.settle()

    def send(
        self,
        target: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    ) -> None:
        """Send one request (``Host`` and the credential's header first)."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host}"]
        if self._auth is not None:
            lines.append(f"{self._auth[0]}: {self._auth[1]}")
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        lines.extend(f"{name}: {value}" for name, value in pairs)
        self._methods.append(method)
        self.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def response(self) -> Response | None:
        """The next complete response, or None while there is none."""
        if not self._methods:
            return None
        found = read_response(
            self.client.data[self._read :],
            head_only=self._methods[0] == "HEAD",
            closed=self.client.lost is not None,
            join_repeated=True,
        )
        if found is None:
            return None
        wire, used = found
        self._read += used
        self._methods.pop(0)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in wire.headers.items()}
        return Response(wire.status, headers, wire.body)

    def request(
        self,
        target: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    ) -> Response:
        """Send one request and return its response; :class:`NoResponseError` if there is
        none once the gateway has done all it can without time passing."""
        self.send(target, method=method, headers=headers)
        response = self.response()
        if response is None:
            why = f"connection lost: {self.lost.value!r}" if self.lost else "still waiting"
            raise NoResponseError(f"{method} {target}: no complete response ({why})", self.lost)
        return response

    def close(self) -> None:
        """Close the connection (over TLS, with a close_notify), and let the gateway see it."""
        if self.client.lost is None:
            self._wire.loseConnection()
        self.gateway.settle()


class MemoryGateway:
    """The real gateway, assembled from ``config`` and started on a memory reactor.

    ``trust_root`` is the CA the test client checks the gateway's certificate against
    (default: the listener's client CA, as with :class:`~promgate.testing.TestPKI`),
    and ``server_name`` the name it checks it for. With ``shared_limits``, the
    connection to Redis is ``redis``, a :class:`~promgate.testing.redis.ScriptedRedis`
    whose calls the test answers: nothing is connected.
    """

    def __init__(
        self,
        config: Config,
        *,
        trust_root: Path | None = None,
        server_name: str = "localhost",
        now: float = START,
        fetch_keys: Fetch | None = None,
    ) -> None:
        self.config = config
        self.trust_root = trust_root
        self.server_name = server_name
        self.reactor = MemoryReactorClock()
        self.reactor.advance(now)
        self.audit = MemoryAuditLog()
        self.network = UpstreamNetwork(self.reactor)
        self.service = GatewayService(
            config,
            # MemoryReactorClock provides every interface the gateway uses, but declares
            # them one by one, not as their combination.
            cast(IGatewayReactor, self.reactor),
            audit_sink=self.audit,
            run_in_thread=_run_now,
            install_signal_handlers=False,
            fetch_keys=fetch_keys if fetch_keys is not None else _no_issuer,
        )
        self._pumps: list[iosim.IOPump] = []
        self._peers = itertools.count(40000)
        self.redis = ScriptedRedis()
        if self.service.shared_limiter is not None:
            self.service.shared_limiter.link = self.redis
        self.service.privilegedStartService()
        self.service.startService()
        #: The listeners as bound on the memory reactor, by name (``admin`` included).
        self.listeners = {
            s.listener_name: self._bound(s.listener_name, s.factory)
            for s in self.service.own_listeners()
        }
        self.settle()

    def reload(self) -> ReloadResult:
        """Reload the configuration file, as ``SIGHUP`` or ``POST /-/reload`` would, and
        see the listeners as they now are."""
        result = self.service.reload("MemoryGateway.reload")
        self.config = self.service.config
        listeners = {}
        for service in self.service.own_listeners():
            name = service.listener_name
            try:
                listeners[name] = self._bound(name, service.factory)
            except LookupError:
                # Same port, a new factory for new connections (the memory reactor keeps
                # the one it was bound with).
                listeners[name] = attrs.evolve(self.listeners[name], factory=service.factory)
        self.listeners = listeners
        self.settle()
        return result

    @classmethod
    def from_config_file(cls, path: str | Path, **kwargs: Any) -> MemoryGateway:
        """Load ``path`` as ``twistd promgate --config`` does, then assemble and start."""
        return cls(load_config(Path(path)), **kwargs)

    def _bound(self, name: str, factory: Any) -> BoundListener:
        for port, f, _, interface in self.reactor.tcpServers:
            if f is factory:
                return BoundListener(name, factory, "tcp", interface=interface, port=port)
        for path, f, *_ in self.reactor.unixServers:
            if f is factory:
                return BoundListener(name, factory, "unix", path=path)
        raise LookupError(f"listener {name} is not bound on the memory reactor")

    # -- upstreams -------------------------------------------------------------------------

    def upstream(
        self,
        address: str,
        *,
        body: bytes = b"",
        paths: Sequence[str] = ("/metrics",),
        handler: Handler | None = None,
        factory: Any = None,
        hold: bool = False,
        connect_error: BaseException | None = None,
        unreachable: bool = False,
    ) -> FakeUpstream:
        """Register the upstream at ``address`` (``host:port``); see :class:`FakeUpstream`."""
        return self.network.add(
            FakeUpstream(
                address,
                body=body,
                paths=paths,
                handler=handler,
                factory=factory,
                hold=hold,
                connect_error=connect_error,
                unreachable=unreachable,
                settle=self.settle,
            )
        )

    # -- clients ---------------------------------------------------------------------------

    def _listener_config(self, name: str | None) -> Listener | None:
        """The configured listener ``name`` (None for admin); by default the only one."""
        if name is None:
            if len(self.config.listeners) != 1:
                names = ", ".join(li.name for li in self.config.listeners)
                raise ValueError(f"say which listener: {names}")
            return self.config.listeners[0]
        if name == "admin":
            return None
        for listener in self.config.listeners:
            if listener.name == name:
                return listener
        raise KeyError(f"no listener {name!r}")

    def connect(
        self,
        identity: Credential = None,
        *,
        listener: str | None = None,
        tls: bool | None = None,
        server_name: str | None = None,
        peer: str | None = None,
    ) -> MemoryConnection:
        """Open a client connection to ``listener`` (the handshake done, if TLS).

        ``tls`` defaults to whether the gateway terminates TLS on that listener; ``peer``
        is the client's address as the gateway sees it (``127.0.0.1:40000`` and up).
        """
        configured = self._listener_config(listener)
        bound = self.listeners[configured.name if configured is not None else "admin"]
        if tls is None:
            tls = configured is not None and configured.tls is not None
            if configured is not None and configured.tcp is not None:
                tls = tls and configured.tcp.mode == "terminate"
        client = Collector()
        client_proto: Any = client
        if tls:
            client_proto = self._tls_client(client, identity, configured, server_name)
        here = (
            IPv4Address("TCP", bound.interface or "127.0.0.1", bound.port)
            if bound.kind == "tcp"
            else UNIXAddress(bound.path)
        )
        there = (
            address(peer)
            if peer is not None
            else IPv4Address("TCP", "127.0.0.1", next(self._peers))
        )
        server_proto = bound.factory.buildProtocol(there)
        client_wire = iosim.FakeTransport(client_proto, False, hostAddress=there, peerAddress=here)
        pump = iosim.connect(
            server_proto,
            iosim.FakeTransport(server_proto, True, hostAddress=here, peerAddress=there),
            client_proto,
            client_wire,
            greet=False,
            clock=self.reactor,
        )
        self._pumps.append(pump)
        self.settle()
        forward = configured is not None and configured.protocol == "forward"
        auth: tuple[str, str] | None = None
        if isinstance(identity, Bearer):
            auth = ("Authorization", f"Bearer {identity.token}")
        elif isinstance(identity, Basic):
            auth = ("Authorization", identity.header_value())
        if auth is not None and forward:
            auth = ("Proxy-Authorization", auth[1])
        if configured is None:
            host = "localhost"
        else:
            host = configured.advertise or f"{server_name or self.server_name}:{bound.port}"
        return MemoryConnection(
            self, client, client_proto if tls else client_wire, host=host, auth=auth
        )

    def _tls_client(
        self,
        client: Collector,
        identity: Credential,
        listener: Listener | None,
        server_name: str | None,
    ) -> Any:
        trust = self.trust_root
        if trust is None:
            if listener is None or listener.tls is None:
                raise ValueError("give trust_root: the listener has no client CA to trust")
            trust = listener.tls.client_ca
        options: dict[str, Any] = {}
        if isinstance(identity, tuple):
            cert, key = identity
            options["clientCertificate"] = PrivateCertificate.loadPEM(
                cert.read_bytes() + key.read_bytes()
            )
        creator = optionsForClientTLS(
            server_name or self.server_name,
            trustRoot=Certificate.loadPEM(trust.read_bytes()),
            **options,
        )
        factory = TLSMemoryBIOFactory(
            creator, True, ClientFactory.forProtocol(lambda: client), clock=self.reactor
        )
        return factory.buildProtocol(None)

    def get(
        self,
        target: str,
        *,
        identity: Credential = None,
        listener: str | None = None,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        method: str = "GET",
    ) -> Response:
        """One request on a new connection, which is closed after the response."""
        conn = self.connect(identity, listener=listener)
        try:
            return conn.request(target, method=method, headers=headers)
        finally:
            conn.close()

    # -- what the gateway did --------------------------------------------------------------

    def audit_records(self, event: str | None = None) -> list[AuditEvent]:
        """The audit records so far (only those of ``event``, if given)."""
        return [e for e in self.audit.events if event is None or e.event == event]

    def metrics_text(self) -> str:
        """``GET /metrics`` on the admin listener: the gateway's own exposition."""
        response = self.get("/metrics", listener="admin")
        assert response.status == 200, response
        return response.body.decode("utf-8")

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """One sample of the gateway's metrics registry, or None."""
        value = self.service.metrics.registry.get_sample_value(name, dict(labels or {}))
        return None if value is None else float(value)

    def explain(self, identity: str, url: str, *, listener: str | None = None) -> Answer:
        """What the listener's policy decides for ``identity`` asking ``url`` (as
        ``promgate explain`` does; for a forward listener an absolute URL or ``CONNECT
        HOST:PORT``, for a tcp listener a server name): no request is made. The answer's
        ``decision`` says allowed or not, why and by which rule; ``status`` is the HTTP
        status the listener would answer with (None on a tcp listener)."""
        asked = question(self.config, listener)
        return asked.ask(self.config.identities[identity], url)

    # -- time and lifecycle ----------------------------------------------------------------

    def settle(self) -> None:
        """Let the gateway do everything it can without time passing: run what is due,
        answer upstream connection attempts, and move bytes until none move."""
        for _ in range(MAX_ROUNDS):
            self.reactor.advance(0)
            moved = self.network.connect_pending()
            for pump in [*self._pumps, *self.network.pumps]:
                moved = pump.pump(advanceClock=False) or moved
            self._pumps = [p for p in self._pumps if not _finished(p)]
            self.network.pumps = [p for p in self.network.pumps if not _finished(p)]
            now = self.reactor.seconds()
            if not moved and not any(c.getTime() <= now for c in self.reactor.getDelayedCalls()):
                return
        raise RuntimeError(f"the gateway was still busy after {MAX_ROUNDS} rounds")

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, stopping at each timer on the way so that what it
        starts happens before the next one."""
        target = self.reactor.seconds() + seconds
        for _ in range(MAX_ROUNDS):
            now = self.reactor.seconds()
            due = [c.getTime() for c in self.reactor.getDelayedCalls() if c.getTime() <= target]
            if not due:
                break
            self.reactor.advance(max(0.0, min(due) - now))
            self.settle()
        else:
            raise RuntimeError(f"timers kept firing after {MAX_ROUNDS} rounds")
        self.reactor.advance(max(0.0, target - self.reactor.seconds()))
        self.settle()

    def stop(self) -> Deferred[None]:
        """Stop the gateway as SIGTERM does: listeners close, in-flight work drains, then
        connections and the audit log close. Fires once it has stopped; time may need to
        pass (``advance``) or held upstreams may need releasing first."""
        d = self.service.stopService()
        self.settle()
        return d


def _finished(pump: iosim.IOPump) -> bool:
    return bool(pump.clientIO.disconnected and pump.serverIO.disconnected)
