"""The listeners waiting on the limits shared through Redis, in memory: the real assembly
on a memory reactor, with the connection to Redis scripted (``ScriptedRedis``). A request
or connection waits for the answer; one lost meanwhile is audited once and gives back what
the answer grants; Redis late is the timeout, then ``on_unavailable``."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase

from promgate.config.loader import load_config
from promgate.listeners.tcp import TCPDownstream
from promgate.shared_limits import SharedLimiter
from promgate.testing import Bearer, MemoryGateway, TestPKI
from promgate.testing.hello import python_client_hello

TOKEN = "agent-token-5f1c"
SCRAPE = "/scrape?route=node&target=10.0.0.5%3A9100"
METRICS = b"up 1\n"

CONFIG = """\
tls: {{certificate: pki/gate.pem, key: pki/gate-key.pem, client_ca: pki/ca.pem}}
admin: {{endpoint: "tcp:9099:interface=127.0.0.1"}}
listeners:
  - {{name: local, protocol: http, endpoint: "tcp:8080:interface=127.0.0.1", tls: false}}
  - {{name: egress, protocol: forward, endpoint: "tcp:3128:interface=127.0.0.1", tls: false}}
  - {{name: raw, protocol: tcp, endpoint: "tcp:9101", route: raw}}
  - {{name: pass, protocol: tcp, endpoint: "tcp:9102", mode: passthrough, route: passed}}
identities:
  agent: {{bearer_sha256: "{token_sha256}", roles: [scraper]}}
  prometheus: {{cert: {{uri: "spiffe://promgate.local/prometheus"}}, roles: [scraper]}}
routes:
  node:
    allow: ["role:scraper"]
    limits: {{rate: 1/s, burst: 5, per: identity, max_concurrent: 5}}
    targets: {{static: ["10.0.0.5:9100"]}}
  free:
    allow: ["role:scraper"]
    targets: {{static: ["10.0.0.6:9100"]}}
  raw:
    allow: ["role:scraper"]
    limits: {{max_concurrent: 5}}
    targets: {{static: ["10.0.0.7:9100"]}}
  secure:
    scheme: https
    allow: ["role:scraper"]
    limits: {{max_concurrent: 5}}
    targets: {{static: ["10.0.0.9:443"]}}
  passed:
    allow: ["sni:*"]
    limits: {{max_concurrent: 5}}
    targets: {{static: ["10.0.0.8:443"]}}
audit: {{path: audit.jsonl, key_file: pki/audit.key}}
shared_limits:
  redis: {{endpoint: "tcp:127.0.0.1:6379", timeout: 50ms, on_unavailable: {mode}}}
"""

_PKI: TestPKI | None = None


class SharedLimitsInMemory(SynchronousTestCase):
    mode = "local"

    def setUp(self) -> None:
        global _PKI
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        if _PKI is None:
            _PKI = TestPKI(root.parent / "pki-shared")
            _PKI.client("prometheus")
        (root / "pki").symlink_to(_PKI.directory)
        path = root / "promgate.yaml"
        text = CONFIG.format(
            token_sha256=hashlib.sha256(TOKEN.encode()).hexdigest(), mode=self.mode
        )
        path.write_text(textwrap.dedent(text))
        self.gw = MemoryGateway(load_config(path))
        limiter = self.gw.service.shared_limiter
        assert isinstance(limiter, SharedLimiter)
        self.limiter = limiter
        self.redis = self.gw.redis
        self.agent = Bearer(TOKEN)

    def requests(self) -> list[tuple[str, str | None, str | None]]:
        return [(e.reason, e.route, e.detail) for e in self.gw.audit_records("request")]


class HTTPTests(SharedLimitsInMemory):
    def test_waits_for_redis(self) -> None:
        """The scrape goes upstream once Redis admits it; the lease is held meanwhile and
        given back (ZREM) when the scrape is over."""
        self.gw.upstream("10.0.0.5:9100", body=METRICS)
        conn = self.gw.connect(self.agent, listener="local")
        conn.send(SCRAPE)
        self.assertIsNone(conn.response())
        ((keys, args, _),) = self.redis.calls
        self.assertEqual(keys, ["promgate:node:c", "promgate:node:b:i:agent"])
        self.assertEqual(args[:4], [5, "1.0", 5, 30000])
        self.redis.answer([0, 0])
        self.gw.settle()
        response = conn.response()
        assert response is not None
        self.assertEqual((response.status, response.body), (200, METRICS))
        self.assertEqual(self.redis.commands, [("ZREM", "promgate:node:c", args[4])])
        self.assertEqual(self.limiter.held(), 0)
        self.assertEqual(self.requests(), [("ok", "node", None)])

    def test_refused_by_redis(self) -> None:
        """Redis's refusal is a 429 whose Retry-After is its delay, rounded up."""
        conn = self.gw.connect(self.agent, listener="local")
        conn.send(SCRAPE)
        self.redis.answer([1, 3334])
        self.gw.settle()
        response = conn.response()
        assert response is not None
        self.assertEqual((response.status, response.headers["retry-after"]), (429, "4"))
        self.assertEqual(response.body, b"rate limited\n")
        self.assertEqual(self.requests(), [("rate_limited", "node", None)])

    def test_lost_while_waiting(self) -> None:
        """A client gone before Redis answers is audited once, then; the lease the late
        answer grants is given back at once."""
        conn = self.gw.connect(self.agent, listener="local")
        conn.send(SCRAPE)
        conn.close()
        detail = "connection lost while the route's shared limits were asked"
        self.assertEqual(self.requests(), [("client_aborted", "node", detail)])
        ((_, args, _),) = self.redis.calls
        self.redis.answer([0, 0])
        self.gw.settle()
        self.assertEqual(self.redis.commands, [("ZREM", "promgate:node:c", args[4])])
        self.assertEqual(self.limiter.held(), 0)
        self.assertEqual(len(self.requests()), 1)

    def test_shutdown_waits_for_the_answer(self) -> None:
        """A shutdown drains a request waiting for Redis like one being relayed: it is
        answered, then the gateway stops (and the connection to Redis is closed)."""
        self.gw.upstream("10.0.0.5:9100", body=METRICS)
        conn = self.gw.connect(self.agent, listener="local")
        conn.send(SCRAPE)
        stopped = self.gw.stop()
        self.assertNoResult(stopped)
        self.redis.answer([0, 0])
        self.gw.settle()
        response = conn.response()
        assert response is not None
        self.assertEqual(response.status, 200)
        self.successResultOf(stopped)
        self.assertFalse(self.redis.connected)
        self.assertEqual(self.requests(), [("ok", "node", None)])

    def test_route_without_limits_is_not_asked(self) -> None:
        """A route with no limits is admitted at once, without Redis."""
        self.gw.upstream("10.0.0.6:9100", body=METRICS)
        response = self.gw.get(
            "/scrape?route=free&target=10.0.0.6%3A9100", identity=self.agent, listener="local"
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(self.redis.calls, [])

    def test_timeout_then_local(self) -> None:
        """Redis silent for the timeout: this process's limits decide; the reply that
        comes after is tidied up (its lease given back)."""
        self.gw.upstream("10.0.0.5:9100", body=METRICS)
        conn = self.gw.connect(self.agent, listener="local")
        conn.send(SCRAPE)
        self.gw.advance(0.05)
        response = conn.response()
        assert response is not None
        self.assertEqual(response.status, 200)
        self.assertEqual(
            self.gw.sample("promgate_shared_limits_unavailable_total", {"on_unavailable": "local"}),
            1,
        )
        self.assertEqual(
            self.gw.sample("promgate_shared_limits_redis_errors_total", {"kind": "timeout"}), 1
        )
        ((_, args, _),) = self.redis.calls
        self.redis.answer([0, 0])
        self.assertEqual(self.redis.commands, [("ZREM", "promgate:node:c", args[4])])
        self.assertEqual(self.gw.service.limiter.in_flight("node"), 0)


class ForwardTests(SharedLimitsInMemory):
    def test_connect_waits_for_redis(self) -> None:
        """A CONNECT is answered once Redis admits it; what the client sent after its
        head meanwhile goes through the tunnel."""
        received: list[bytes] = []

        class Sink(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        self.gw.upstream("10.0.0.9:443", factory=Factory.forProtocol(Sink))
        conn = self.gw.connect(self.agent, listener="egress")
        conn.send("10.0.0.9:443", method="CONNECT")
        conn.write(b"early")
        self.assertEqual(conn.received, b"")
        self.redis.answer([0, 0])
        self.gw.settle()
        self.assertTrue(conn.received.startswith(b"HTTP/1.1 200 Connection established"))
        self.assertEqual(b"".join(received), b"early")
        self.assertEqual(self.limiter.held(), 1)
        conn.close()
        self.assertEqual(self.limiter.held(), 0)
        (record,) = self.gw.audit_records("request")
        self.assertEqual((record.decision, record.route, record.status), ("allow", "secure", 200))


class DenyTests(SharedLimitsInMemory):
    mode = "deny"

    def test_timeout_then_deny(self) -> None:
        """``on_unavailable: deny``: 503, with its constant body."""
        conn = self.gw.connect(self.agent, listener="local")
        conn.send(SCRAPE)
        self.gw.advance(0.05)
        response = conn.response()
        assert response is not None
        self.assertEqual(
            (response.status, response.body), (503, b"rate limits unavailable, try later\n")
        )
        self.assertEqual(self.requests(), [("limits_unavailable", "node", None)])


class TCPTests(SharedLimitsInMemory):
    def test_lost_while_waiting(self) -> None:
        """A tcp connection gone before Redis answers: one record, then; the lease the
        answer grants is given back, and no upstream is connected."""
        assert _PKI is not None
        conn = self.gw.connect(_PKI.client("prometheus"), listener="raw")
        self.assertEqual(len(self.redis.calls), 1)
        conn.close()
        (record,) = self.gw.audit_records("connection")
        self.assertEqual(
            (record.decision, record.reason, record.route, record.target),
            ("deny", "client_aborted", "raw", "10.0.0.7:9100"),
        )
        ((_, args, _),) = self.redis.calls
        self.redis.answer([0, 0])
        self.gw.settle()
        self.assertEqual(self.redis.commands, [("ZREM", "promgate:raw:c", args[4])])
        self.assertEqual(len(self.gw.audit_records("connection")), 1)

    def test_admitted_after_waiting(self) -> None:
        """What the client sent while Redis was asked reaches the upstream first."""
        assert _PKI is not None
        received: list[bytes] = []

        class Sink(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        self.gw.upstream("10.0.0.7:9100", factory=Factory.forProtocol(Sink))
        conn = self.gw.connect(_PKI.client("prometheus"), listener="raw")
        conn.write(b"hello")
        self.assertEqual(received, [])
        self.redis.answer([0, 0])
        self.gw.settle()
        self.assertEqual(b"".join(received), b"hello")
        self.assertEqual(self.limiter.held(), 1)

    def test_half_closed_while_waiting(self) -> None:
        """A client that sends its bytes and half-closes while Redis is asked: the bytes
        reach the upstream, and the relay knows the client's stream has ended (it passes
        the FIN on; iosim has no half-close to show it)."""
        received: list[bytes] = []

        class Sink(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        self.gw.upstream("10.0.0.8:443", factory=Factory.forProtocol(Sink))
        hello = python_client_hello("a.example.org")
        conn = self.gw.connect(listener="pass")
        conn.write(hello)
        self.assertEqual(len(self.redis.calls), 1)
        conn.write(b"more")
        # iosim has no half-close: the gateway's side is told as TCP would tell it.
        server = self.gw._pumps[-1].server
        assert isinstance(server, TCPDownstream)
        server.readConnectionLost()
        self.redis.answer([0, 0])
        self.gw.settle()
        self.assertEqual(b"".join(received), hello + b"more")
        assert server.relay is not None
        self.assertTrue(server.relay.client_eof)
