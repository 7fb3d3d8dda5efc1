"""Service discovery: providers on an injected clock, selectors, membership, /sd, plugins.

Unit tests run in memory (a ``Clock``, in-memory files, a fake resolver); one class asks
a real ``twisted.names`` server on loopback UDP in this process.
"""

from __future__ import annotations

import fnmatch
import json
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import authority, dns, server
from twisted.names.error import DNSNameError, DNSServerError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from promgate.config.model import Identity, ProviderSpec, Route, Selector, Target
from promgate.discovery import (
    BaseProvider,
    CompiledSelector,
    Discovered,
    Discovery,
    IDiscoveryProvider,
    discovery_factories,
)
from promgate.discovery.dns_srv import DNSSRV, make_resolver
from promgate.discovery.file_sd import FileSD, parse_file_sd
from promgate.http.refusals import decision_status
from promgate.identity import Recognition
from promgate.listeners.forward import ForwardPolicy
from promgate.metrics import Metrics
from promgate.policy import ScrapePolicy, ScrapeQuery
from promgate.sd import render_http_sd

EXAMPLE = (
    Path(__file__).resolve().parent.parent
    / "etc/plugins/twisted/plugins/promgate_example_discovery.py"
)
PROM = Identity("prometheus", roles=frozenset({"scraper"}))


class MemoryFS:
    """Files in a dict; each write bumps the file's version (its "mtime")."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, int]] = {}
        self.reads = 0

    def write(self, path: str, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        version = self.files.get(path, (b"", 0))[1] + 1
        self.files[path] = (raw, version)

    def remove(self, path: str) -> None:
        del self.files[path]

    def glob(self, pattern: str) -> list[str]:
        return [p for p in self.files if fnmatch.fnmatch(p, pattern)]

    def signature(self, path: str) -> tuple[int, int, int] | None:
        found = self.files.get(path)
        return None if found is None else (found[1], len(found[0]), 0)

    def read(self, path: str) -> bytes:
        if path not in self.files:
            raise FileNotFoundError(path)
        self.reads += 1
        return self.files[path][0]


def group(*targets: str, **labels: str) -> dict[str, Any]:
    return {"targets": list(targets), "labels": labels}


def route(name: str = "node", **kw: Any) -> Route:
    kw.setdefault("allow", ("role:scraper",))
    kw.setdefault("targets", ())
    return Route(name, **kw)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value: float | None = metrics.registry.get_sample_value(name, labels)
    return value


class SingleProvider:
    """Builds the one given provider for any spec (Discovery's ``build`` hook)."""

    def __init__(self, provider: IDiscoveryProvider) -> None:
        self.provider = provider

    def __call__(self, spec: ProviderSpec, reactor: Any) -> IDiscoveryProvider:
        return self.provider


class FileSDTests(SynchronousTestCase):
    """file_sd follows its files on the clock: add, change, corrupt, remove."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.fs = MemoryFS()
        self.provider = FileSD(
            ["/sd/*.json", "/sd/*.yml"],
            self.clock,
            refresh_interval=300,
            poll_interval=5,
            fs=self.fs,
        )
        self.metrics = Metrics(CollectorRegistry())
        spec = ProviderSpec("file_sd", "file_sd")
        self.route = route(providers=(spec,), targets=(Target("static:1"),))
        self.discovery = Discovery(
            {"node": self.route},
            self.clock,
            metrics=self.metrics,
            build=SingleProvider(self.provider),
        )
        self.policy = ScrapePolicy({"node": self.route}, membership=self.discovery.membership)

    def members(self) -> list[str]:
        return sorted(self.discovery.membership.current["node"])

    def allowed(self, target: str) -> bool:
        query = ScrapeQuery("node", target, None, ())
        return self.policy.decide(Recognition(PROM, "ok"), query).allowed

    def test_follows_files(self) -> None:
        """A new file's targets join at the next poll; a changed file replaces its own; a
        corrupt file keeps its previous contents (counted as a failure); a removed file
        takes its targets away, and /scrape refuses them from the next request."""
        self.fs.write("/sd/a.json", json.dumps([group("10.0.0.1:9100", job="node")]))
        self.successResultOf(self.discovery.start())
        self.assertEqual(self.members(), ["10.0.0.1:9100", "static:1"])
        self.assertTrue(self.discovery.settled())

        self.fs.write("/sd/b.yml", "- targets: ['10.0.0.2:9100']\n  labels: {job: node}\n")
        self.assertFalse(self.allowed("10.0.0.2:9100"))
        self.clock.advance(5)
        self.assertEqual(self.members(), ["10.0.0.1:9100", "10.0.0.2:9100", "static:1"])
        self.assertTrue(self.allowed("10.0.0.2:9100"))

        self.fs.write("/sd/a.json", json.dumps([group("10.0.0.3:9100")]))
        self.clock.advance(5)
        self.assertEqual(self.members(), ["10.0.0.2:9100", "10.0.0.3:9100", "static:1"])
        self.assertFalse(self.allowed("10.0.0.1:9100"))

        self.fs.write("/sd/a.json", "[{not json")
        self.clock.advance(5)
        self.assertEqual(self.members(), ["10.0.0.2:9100", "10.0.0.3:9100", "static:1"])
        self.assertEqual(
            sample(
                self.metrics, "promgate_discovery_failures_total", route="node", provider="file_sd"
            ),
            1.0,
        )
        self.clock.advance(5)  # the same bad file is not re-reported at every poll
        self.assertEqual(
            sample(
                self.metrics, "promgate_discovery_failures_total", route="node", provider="file_sd"
            ),
            1.0,
        )

        self.fs.remove("/sd/a.json")
        self.clock.advance(5)
        self.assertEqual(self.members(), ["10.0.0.2:9100", "static:1"])
        self.assertFalse(self.allowed("10.0.0.3:9100"))
        self.assertTrue(self.allowed("static:1"))
        self.assertEqual(
            sample(self.metrics, "promgate_discovery_targets", route="node", provider="file_sd"),
            1.0,
        )
        self.assertEqual(
            sample(
                self.metrics,
                "promgate_discovery_last_success_timestamp_seconds",
                route="node",
                provider="file_sd",
            ),
            25.0,
        )

    def test_safety_net(self) -> None:
        """Unchanged files are read only at the refresh interval."""
        self.fs.write("/sd/a.json", json.dumps([group("10.0.0.1:9100")]))
        self.successResultOf(self.discovery.start())
        reads = self.fs.reads
        self.clock.pump([5] * 59)
        self.assertEqual(self.fs.reads, reads)
        self.clock.advance(5)
        self.assertEqual(self.fs.reads, reads + 1)

    def test_labels(self) -> None:
        """Groups carry their labels and __meta_filepath; reserved labels from a file are
        dropped so that a file cannot set the gateway's own __param_* labels."""
        self.fs.write(
            "/sd/a.json",
            json.dumps([group("10.0.0.1:9100", job="node", __param_path="/debug")]),
        )
        self.successResultOf(self.discovery.start())
        target = self.discovery.membership.current["node"]["10.0.0.1:9100"]
        self.assertEqual(dict(target.labels), {"job": "node", "__meta_filepath": "/sd/a.json"})

    def test_stop(self) -> None:
        """A stopped discovery leaves nothing on the clock."""
        self.successResultOf(self.discovery.start())
        self.discovery.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ParseFileSDTests(SynchronousTestCase):
    """What a file_sd file may hold."""

    def test_refused(self) -> None:
        """Anything but a list of {targets, labels} groups of host:port is refused whole."""
        for text in (
            "{}",
            '[{"labels": {}}]',
            '[{"targets": ["nope"]}]',
            '[{"targets": ["a:1"], "labels": {"x": 1}}]',
            '[{"targets": ["a:1"], "extra": 1}]',
        ):
            self.assertRaises(ValueError, parse_file_sd, "/x.json", text.encode())

    def test_empty(self) -> None:
        """An empty YAML file is no targets."""
        self.assertEqual(parse_file_sd("/x.yml", b""), ())


class SelectorTests(SynchronousTestCase):
    """Label matchers are anchored like Prometheus's; addresses are rewritten."""

    targets = (
        Target("10.0.0.1:8080", {"job": "node", "env": "prod"}),
        Target("10.0.0.2:8080", {"job": "node", "env": "preprod"}),
        Target("10.0.0.3:8080", {"job": "nodes", "env": "staging"}),
        Target("[2001:db8::1]:8080", {"job": "node", "env": "staging"}),
    )

    def apply(self, **kw: Any) -> list[str]:
        out, problems = CompiledSelector(Selector(**kw)).apply(self.targets)
        self.assertEqual(problems, [])
        return [t.address for t in out]

    def test_anchored(self) -> None:
        """ "prod|staging" matches prod and staging, not preprod; "node" not "nodes"."""
        self.assertEqual(
            self.apply(match={"job": "node", "env": "prod|staging"}),
            ["10.0.0.1:8080", "[2001:db8::1]:8080"],
        )

    def test_missing_label_is_empty(self) -> None:
        """A missing label matches the empty string, as in Prometheus."""
        self.assertEqual(self.apply(match={"team": ""}), [t.address for t in self.targets])
        self.assertEqual(self.apply(match={"team": ".+"}), [])

    def test_port(self) -> None:
        self.assertEqual(
            self.apply(match={"env": "staging"}, port=9100),
            ["10.0.0.3:9100", "[2001:db8::1]:9100"],
        )

    def test_address_template(self) -> None:
        self.assertEqual(
            self.apply(match={"job": "node"}, address="{host}:1{port}"),
            ["10.0.0.1:18080", "10.0.0.2:18080", "[2001:db8::1]:18080"],
        )
        self.assertEqual(
            self.apply(match={"env": "prod"}, address="{env}.example.org:9100"),
            ["prod.example.org:9100"],
        )

    def test_unusable_rewrite(self) -> None:
        """A rewrite making no valid host:port is dropped and reported."""
        out, problems = CompiledSelector(Selector(address="{host}:{port}0000")).apply(
            self.targets[:1]
        )
        self.assertEqual((out, len(problems)), ([], 1))


class FakeResolver:
    """An in-memory IResolver: SRV, A and AAAA answers by name, or an exception."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, int], Any] = {}
        self.additional: dict[str, list[dns.RRHeader]] = {}

    def srv(self, name: str, *entries: tuple[str, int], ttl: int = 60) -> None:
        self.records[(name, dns.SRV)] = [
            dns.RRHeader(name, dns.SRV, ttl=ttl, payload=dns.Record_SRV(0, 0, port, host))
            for host, port in entries
        ]

    def a(self, name: str, *ips: str, ttl: int = 60) -> None:
        self.records[(name, dns.A)] = [
            dns.RRHeader(name, dns.A, ttl=ttl, payload=dns.Record_A(ip)) for ip in ips
        ]

    def _answer(self, name: str, rtype: int) -> defer.Deferred[Any]:
        found = self.records.get((name, rtype), [])
        if isinstance(found, Exception):
            return defer.fail(found)
        return defer.succeed((found, [], self.additional.get(name, [])))

    def lookupService(self, name: str, timeout: Any = None) -> defer.Deferred[Any]:
        return self._answer(name, dns.SRV)

    def lookupAddress(self, name: str, timeout: Any = None) -> defer.Deferred[Any]:
        return self._answer(name, dns.A)

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> defer.Deferred[Any]:
        return self._answer(name, dns.AAAA)


class DNSSRVTests(SynchronousTestCase):
    """dns_srv: SRV, then A/AAAA; TTLs within bounds; failures keep the last good set."""

    def setUp(self) -> None:
        self.resolver = FakeResolver()
        self.provider = DNSSRV(
            ["_node._tcp.example.org"], self.resolver, refresh_interval=60, min_interval=5
        )

    def addresses(self) -> list[str]:
        found = self.successResultOf(self.provider.refresh())
        assert isinstance(found, Discovered)
        return sorted(t.address for t in found.targets)

    def test_srv_then_addresses(self) -> None:
        self.resolver.srv(
            "_node._tcp.example.org", ("a.example.org", 9100), ("b.example.org", 9200)
        )
        self.resolver.a("a.example.org", "10.0.0.1", "10.0.0.2")
        self.resolver.records[("b.example.org", dns.AAAA)] = [
            dns.RRHeader("b.example.org", dns.AAAA, payload=dns.Record_AAAA("2001:db8::2"))
        ]
        self.assertEqual(self.addresses(), ["10.0.0.1:9100", "10.0.0.2:9100", "[2001:db8::2]:9200"])
        found = self.successResultOf(self.provider.refresh())
        assert isinstance(found, Discovered)
        labels = dict(found.targets[0].labels)
        self.assertEqual(labels["__meta_dns_name"], "_node._tcp.example.org")
        self.assertEqual(labels["__meta_dns_srv_record_target"], "a.example.org")

    def test_glue(self) -> None:
        """Addresses in the SRV answer's additional section are used without asking again."""
        self.resolver.srv("_node._tcp.example.org", ("a.example.org", 9100))
        self.resolver.additional["_node._tcp.example.org"] = [
            dns.RRHeader("a.example.org", dns.A, payload=dns.Record_A("10.9.9.9"))
        ]
        self.assertEqual(self.addresses(), ["10.9.9.9:9100"])

    def test_ttl_bounds(self) -> None:
        """The next refresh follows the shortest TTL, within [min_interval, refresh_interval]."""
        for ttl, expected in ((30, 30), (1, 5), (3600, 60)):
            self.resolver.srv("_node._tcp.example.org", ("a.example.org", 9100), ttl=ttl)
            self.resolver.a("a.example.org", "10.0.0.1", ttl=ttl)
            self.addresses()
            self.assertEqual(self.provider.next_interval(True), expected)
        self.assertEqual(self.provider.next_interval(False), 5)

    def test_failure_keeps_last_good(self) -> None:
        """A failed lookup keeps the name's last targets; NXDOMAIN empties it."""
        self.resolver.srv("_node._tcp.example.org", ("a.example.org", 9100))
        self.resolver.a("a.example.org", "10.0.0.1")
        self.assertEqual(self.addresses(), ["10.0.0.1:9100"])
        self.resolver.records[("_node._tcp.example.org", dns.SRV)] = DNSServerError("SERVFAIL")
        found = self.successResultOf(self.provider.refresh())
        self.assertEqual([t.address for t in found.targets], ["10.0.0.1:9100"])
        self.assertEqual(len(found.errors), 1)
        self.resolver.records[("_node._tcp.example.org", dns.SRV)] = DNSNameError("NXDOMAIN")
        self.assertEqual(self.addresses(), [])

    def test_runner_on_clock(self) -> None:
        """Under Discovery, the provider is asked again when the TTL runs out."""
        clock = Clock()
        self.resolver.srv("_node._tcp.example.org", ("a.example.org", 9100), ttl=20)
        self.resolver.a("a.example.org", "10.0.0.1", ttl=20)
        spec = ProviderSpec("dns_srv", "dns_srv")
        discovery = Discovery(
            {"node": route(providers=(spec,))}, clock, build=SingleProvider(self.provider)
        )
        self.successResultOf(discovery.start())
        self.assertEqual(list(discovery.membership.current["node"]), ["10.0.0.1:9100"])
        self.resolver.a("a.example.org", "10.0.0.7", ttl=20)
        clock.advance(19)
        self.assertEqual(list(discovery.membership.current["node"]), ["10.0.0.1:9100"])
        clock.advance(1)
        self.assertEqual(list(discovery.membership.current["node"]), ["10.0.0.7:9100"])


class ReadinessTests(SynchronousTestCase):
    """/-/ready waits for discovery's first round, so a new gateway does not answer 404
    for targets it has not looked up yet."""

    def test_not_ready_until_first_lookup_answers(self) -> None:
        """While the first SRV lookup is pending the gateway is not ready; once it has
        answered (here: with targets) it is."""
        from promgate.admin import Readiness

        pending: defer.Deferred[Any] = defer.Deferred()
        resolver = FakeResolver()
        resolver.lookupService = lambda name, timeout=None: pending  # type: ignore[method-assign]
        resolver.a("a.example.org", "10.0.0.1")
        provider = DNSSRV(["_node._tcp.example.org"], resolver, refresh_interval=60)
        discovery = Discovery(
            {"node": route(providers=(ProviderSpec("dns_srv", "dns_srv"),))},
            Clock(),
            build=SingleProvider(provider),
        )
        discovery.start()
        readiness = Readiness(discovery.settled)
        readiness.ready = True  # the listeners are up
        self.assertFalse(readiness.is_ready())
        record = dns.Record_SRV(0, 0, 9100, "a.example.org")
        pending.callback(
            ([dns.RRHeader("_node._tcp.example.org", dns.SRV, payload=record)], [], [])
        )
        self.assertTrue(readiness.is_ready())
        self.assertEqual(list(discovery.membership.current["node"]), ["10.0.0.1:9100"])


class MemoryAuthority(authority.FileAuthority):
    """An authoritative zone held in memory, for a real twisted.names server."""

    def __init__(self, soa: tuple[bytes, dns.Record_SOA], records: dict[bytes, list[Any]]) -> None:
        authority.FileAuthority.__init__(self, None)  # type: ignore[no-untyped-call]
        self.soa = soa
        self.records = records

    def loadFile(self, filename: Any) -> None:
        pass


class LoopbackDNSTests(TestCase):
    """dns_srv against a real twisted.names server on 127.0.0.1 (UDP), in this process."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        zone = b"example.test"
        soa = dns.Record_SOA(mname=b"ns." + zone, rname=b"root." + zone, serial=1, minimum=60)
        records: dict[bytes, list[Any]] = {
            zone: [soa],
            b"_node._tcp.example.test": [
                dns.Record_SRV(0, 0, 9100, b"a.example.test", ttl=30),
                dns.Record_SRV(0, 0, 9200, b"b.example.test", ttl=30),
            ],
            b"a.example.test": [dns.Record_A("127.0.0.11", ttl=30)],
            b"b.example.test": [dns.Record_AAAA("::1", ttl=30)],
        }
        self.authority = MemoryAuthority((zone, soa), records)
        factory = server.DNSServerFactory(authorities=[self.authority])
        protocol = dns.DNSDatagramProtocol(factory)
        self.port = reactor.listenUDP(0, protocol, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)
        self.reactor = reactor

    @defer.inlineCallbacks  # type: ignore[misc]
    def test_resolves_over_udp(self) -> Any:
        """SRV, then A and AAAA, from the server given in ``servers``."""
        resolver = make_resolver([("127.0.0.1", self.port.getHost().port)], self.reactor)
        provider = DNSSRV(["_node._tcp.example.test", "_gone._tcp.example.test"], resolver)
        found = yield provider.refresh()
        for pending in self.reactor.getDelayedCalls():  # type: ignore[attr-defined]
            if "Resolver" in repr(pending.func) and pending.active():
                pending.cancel()
        self.assertEqual(
            sorted(t.address for t in found.targets), ["127.0.0.11:9100", "[::1]:9200"]
        )
        self.assertEqual(found.errors, ())
        self.assertEqual(provider.next_interval(True), 30)


class MembershipTests(SynchronousTestCase):
    """ScrapePolicy, ForwardPolicy and /sd read the current membership."""

    def setUp(self) -> None:
        self.route = route(keep_meta_labels=False, labels={"team": "infra"})
        self.routes = {"node": self.route}
        self.scrape = ScrapePolicy(self.routes)
        self.forward = ForwardPolicy(self.routes, membership=self.scrape.membership)

    def test_swap(self) -> None:
        """A swapped-in set answers the next decision; the static default stays for tools."""
        recognition = Recognition(PROM, "ok")
        query = ScrapeQuery("node", "10.0.0.1:9100", None, ())
        self.assertFalse(self.scrape.decide(recognition, query).allowed)
        self.assertEqual(
            decision_status(self.forward.decide_connect(recognition, "10.0.0.1:9100")), 403
        )
        self.scrape.membership.replace("node", {"10.0.0.1:9100": Target("10.0.0.1:9100")})
        self.assertTrue(self.scrape.decide(recognition, query).allowed)
        decision = self.forward.decide_request(recognition, "10.0.0.1:9100", "/metrics", ())
        self.assertTrue(decision.allowed)
        self.scrape.membership.replace("node", {})
        self.assertEqual(decision_status(self.scrape.decide(recognition, query)), 404)
        self.assertFalse(
            self.forward.decide_request(recognition, "10.0.0.1:9100", "/metrics", ()).allowed
        )

    def test_sd_meta_labels(self) -> None:
        """/sd carries discovered labels, __meta_* only when the route keeps them."""
        target = Target("10.0.0.1:9100", {"job": "node", "__meta_filepath": "/sd/a.json"})
        members: Mapping[str, Mapping[str, Target]] = {"node": {target.address: target}}
        (doc,) = json.loads(render_http_sd([self.route], "gate:9443", "https", members))
        self.assertEqual(doc["labels"]["job"], "node")
        self.assertEqual(doc["labels"]["team"], "infra")
        self.assertNotIn("__meta_filepath", doc["labels"])
        kept = route(keep_meta_labels=True)
        (doc,) = json.loads(render_http_sd([kept], "gate:9443", "https", members))
        self.assertEqual(doc["labels"]["__meta_filepath"], "/sd/a.json")


PLUGIN = '''\
"""An example discovery plugin for a test: targets from its settings."""
from twisted.plugin import IPlugin
from zope.interface import provider

from promgate.config.model import Target
from promgate.discovery import BaseProvider, IDiscoveryProviderFactory


class Listed(BaseProvider):
    def __init__(self, hosts, port):
        self.hosts, self.port = hosts, port

    def refresh(self):
        return [Target(f"{h}:{self.port}", {"source": "listed"}) for h in self.hosts]


@provider(IPlugin, IDiscoveryProviderFactory)
class ListedFactory:
    name = "listed-for-test"

    @staticmethod
    def check(settings):
        if not isinstance(settings.get("hosts"), list):
            return [("hosts", "must be a list of host names")]
        return []

    @staticmethod
    def build(settings, reactor, base):
        return Listed(settings["hosts"], settings.get("port", 9100))

'''


class PluginTests(SynchronousTestCase):
    """A provider dropped into twisted/plugins/ on sys.path is found and configured."""

    def setUp(self) -> None:
        root = Path(self.mktemp())
        plugins = root / "twisted" / "plugins"
        plugins.mkdir(parents=True)
        (plugins / "listed_for_test.py").write_text(PLUGIN)
        (plugins / EXAMPLE.name).write_text(EXAMPLE.read_text())
        sys.path.insert(0, str(root))
        self.addCleanup(sys.path.remove, str(root))

        from twisted import plugins as twisted_plugins

        before = list(twisted_plugins.__path__)

        def restore() -> None:
            twisted_plugins.__path__[:] = before
            sys.modules.pop("twisted.plugins.listed_for_test", None)
            sys.modules.pop(f"twisted.plugins.{EXAMPLE.stem}", None)

        self.addCleanup(restore)

    def test_found(self) -> None:
        self.assertIn("listed-for-test", discovery_factories())

    def test_plugin_folder_left_as_it_was(self) -> None:
        """Finding plugins writes nothing into their folder (no ``dropin.cache``): it may
        be a checkout, or a read-only ``/etc``."""
        folder = Path(sys.path[0]) / "twisted" / "plugins"
        before = sorted(p.name for p in folder.iterdir() if p.name != "__pycache__")
        discovery_factories()
        discovery_factories()
        after = sorted(p.name for p in folder.iterdir() if p.name != "__pycache__")
        self.assertEqual(after, before)

    def test_broken_plugin_module(self) -> None:
        """A plugin module that fails to import is logged and skipped; the others load."""
        folder = Path(sys.path[0]) / "twisted" / "plugins"
        (folder / "broken_for_test.py").write_text("raise RuntimeError('broken')\n")
        self.addCleanup(sys.modules.pop, "twisted.plugins.broken_for_test", None)
        self.assertIn("listed-for-test", discovery_factories())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_shipped_example(self) -> None:
        """The example plugin under etc/plugins checks its settings and lists its hosts."""
        factory = discovery_factories()["example-list"]
        self.assertEqual([k for k, _ in factory.check({"hosts": "a", "x": 1})], ["hosts", "x"])
        provider = factory.build({"hosts": ["a.example.org"], "port": 9101}, None, Path("."))
        self.assertEqual(provider.refresh(), [Target("a.example.org:9101", {"source": "example"})])

    def test_configured(self) -> None:
        """check-config checks the plugin's settings; Discovery builds and runs it."""
        from promgate.testing.configs import ConfigTree

        tree = ConfigTree(Path(self.mktemp())).standard()
        tree.write(
            "conf.d/zz.yaml",
            textwrap.dedent(
                """\
                routes:
                  listed:
                    allow: [ops]
                    targets:
                      plugin: {name: listed-for-test, hosts: [a.example.org, b.example.org]}
                      port: 9101
                  bad:
                    allow: [ops]
                    targets:
                      plugin: {name: listed-for-test, hosts: nope}
                """
            ),
        )
        config, errors, _ = tree.check()
        self.assertEqual(
            [(e.key, e.line) for e in errors], [("routes.bad.targets.plugin.hosts", 10)]
        )
        tree.write("conf.d/zz.yaml", tree.texts["conf.d/zz.yaml"].split("  bad:")[0])
        config, errors, _ = tree.check()
        self.assertEqual(errors, [])
        assert config is not None
        clock = Clock()
        discovery = Discovery(config.routes, clock)
        self.successResultOf(discovery.start())
        self.assertEqual(
            sorted(discovery.membership.current["listed"]),
            ["a.example.org:9101", "b.example.org:9101"],
        )
        discovery.stop()


class FailingProviderTests(SynchronousTestCase):
    """A provider that raises keeps its last good set and is retried."""

    def test_keeps_last_good(self) -> None:
        class Flaky(BaseProvider):
            refresh_interval = 10.0
            fail = False

            def refresh(self) -> list[Target]:
                if self.fail:
                    raise OSError("source unavailable")
                return [Target("10.0.0.1:9100")]

        flaky = Flaky()
        clock = Clock()
        metrics = Metrics(CollectorRegistry())
        spec = ProviderSpec("plugin", "flaky")
        discovery = Discovery(
            {"node": route(providers=(spec,))}, clock, metrics=metrics, build=SingleProvider(flaky)
        )
        self.successResultOf(discovery.start())
        flaky.fail = True
        clock.advance(10)
        self.assertEqual(list(discovery.membership.current["node"]), ["10.0.0.1:9100"])
        self.assertEqual(
            sample(metrics, "promgate_discovery_failures_total", route="node", provider="flaky"),
            1.0,
        )
        self.assertEqual(
            sample(
                metrics,
                "promgate_discovery_last_success_timestamp_seconds",
                route="node",
                provider="flaky",
            ),
            0.0,
        )
