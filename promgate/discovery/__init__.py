"""Service discovery: providers find targets, routes take the ones their selector admits.

Every provider (``static``, ``file_sd``, ``dns_srv``, and third-party plugins) sits behind
one interface, ``IDiscoveryProvider``: ``refresh()`` discovers the provider's complete
current set. A ``ProviderRunner`` calls it on the injected clock (early when the provider
says its source ``changed()``), keeps the last good set when a refresh fails, filters
and rewrites the result with the route's ``Selector`` and hands it to ``Discovery``,
which swaps the route's new member dict into the shared ``Membership`` that every
``/scrape`` is checked against.

Third-party providers are ``IDiscoveryProviderFactory`` plugins found with
``twisted.plugin.getPlugins`` in ``twisted/plugins/`` (see docs/discovery.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from promgate.addresses import address_parts, host_port, split_address
from promgate.config.model import ProviderSpec, Route, Selector, Target
from promgate.discovery.provider import (
    DEFAULT_POLL_INTERVAL,
    BaseProvider,
    Discovered,
    IDiscoveryProvider,
    IDiscoveryProviderFactory,
)
from promgate.policy import Membership
from promgate.reactors import IDiscoveryReactor

_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

# -- selection -------------------------------------------------------------------------------


class CompiledSelector:
    """A route's ``Selector`` ready to apply: fully anchored regular expressions."""

    def __init__(self, selector: Selector) -> None:
        self.selector = selector
        self.match = [(name, re.compile(rx)) for name, rx in selector.match.items()]

    def apply(self, targets: Iterable[Target]) -> tuple[list[Target], list[str]]:
        """The targets admitted, rewritten, with discovery's reserved labels dropped;
        plus a problem for each target whose rewritten address is unusable."""
        out: list[Target] = []
        problems: list[str] = []
        for target in targets:
            seen = dict(target.labels)
            seen["__address__"] = target.address
            if not all(rx.fullmatch(seen.get(name, "")) for name, rx in self.match):
                continue
            address = self.rewrite(target)
            if address is None or split_address(address) is None:
                problems.append(f"{target.address}: rewritten address {address!r} is unusable")
                continue
            out.append(Target(address, clean_labels(target.labels)))
        return out, problems

    def rewrite(self, target: Target) -> str | None:
        s = self.selector
        if s.port is None and s.address is None:
            return target.address
        host, port = address_parts(target.address)
        if s.port is not None:
            return host_port(host, s.port)
        assert s.address is not None
        fields = dict(target.labels)
        fields.update(host=host, port=port, address=target.address)
        try:
            return s.address.format_map(fields)
        except (KeyError, ValueError, IndexError):
            return None


def clean_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Valid label names only; ``__``-prefixed ones only if ``__meta_*``: a discovered
    target must not set the gateway's own ``__param_*``/``__scheme__`` labels."""
    return {
        k: str(v)
        for k, v in labels.items()
        if _LABEL.match(k) and (not k.startswith("__") or k.startswith("__meta_"))
    }


# -- running providers -----------------------------------------------------------------------


class ProviderRunner:
    """Refreshes one provider of one route on the clock and keeps its last good set."""

    log = Logger()

    def __init__(
        self,
        route: str,
        name: str,
        provider: IDiscoveryProvider,
        clock: IReactorTime,
        on_change: Callable[[], None],
        *,
        selector: Selector | None = None,
        metrics: Any = None,
    ) -> None:
        self.route = route
        self.name = name
        self.provider = provider
        self.clock = clock
        self.on_change = on_change
        self.selector = CompiledSelector(selector) if selector is not None else None
        self.metrics = metrics
        #: The last good (selected, rewritten) set.
        self.targets: tuple[Target, ...] = ()
        #: Refreshes attempted; the first one settles the runner.
        self.attempts = 0
        self.last_error: str | None = None
        self._due = 0.0
        self._call: IDelayedCall | None = None
        self._running: Deferred[None] | None = None
        self._stopped = True

    def start(self) -> Deferred[None]:
        """Refresh now, then keep refreshing; fires when the first refresh is over."""
        self._stopped = False
        return self.refresh_now()

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def refresh_now(self) -> Deferred[None]:
        if self._running is not None:
            return self._running
        started = self.clock.seconds()
        d: Deferred[Any] = Deferred()
        self._running = d  # before the refresh, which may finish at once
        d.addCallbacks(
            self._succeeded, self._failed, errbackArgs=(started,), callbackArgs=(started,)
        )
        d.addBoth(self._done)
        maybeDeferred(self.provider.refresh).chainDeferred(d)
        return d

    def _succeeded(self, result: Any, started: float) -> None:
        found = result if isinstance(result, Discovered) else Discovered(tuple(result))
        targets: Sequence[Target] = found.targets
        errors = list(found.errors)
        if self.selector is not None:
            targets, problems = self.selector.apply(targets)
            errors += problems
        self._observe(started)
        previous = self.targets
        self.targets = tuple(targets)
        if errors:
            self._failure("; ".join(errors))
        else:
            self.last_error = None
            if self.metrics is not None:
                self.metrics.discovery_last_success.labels(self.route, self.name).set(
                    self.clock.seconds()
                )
        if self.metrics is not None:
            self.metrics.discovery_targets.labels(self.route, self.name).set(len(self.targets))
        self._schedule(self.provider.next_interval(not errors))
        if self.targets != previous:
            self.log.info(
                "discovery: route {route} provider {provider}: {count} target(s)",
                route=self.route,
                provider=self.name,
                count=len(self.targets),
            )
            self.on_change()

    def _failed(self, failure: Failure, started: float) -> None:
        self._observe(started)
        self._failure(failure.getErrorMessage() or str(failure.type))
        self._schedule(self.provider.next_interval(False))

    def _observe(self, started: float) -> None:
        if self.metrics is not None:
            self.metrics.discovery_refresh_duration.labels(self.name).observe(
                max(0.0, self.clock.seconds() - started)
            )

    def _failure(self, message: str) -> None:
        self.last_error = message
        if self.metrics is not None:
            self.metrics.discovery_failures.labels(self.route, self.name).inc()
        self.log.warn(
            "discovery: route {route} provider {provider} failed, keeping its last good "
            "targets: {error}",
            route=self.route,
            provider=self.name,
            error=message,
        )

    def _done(self, result: object) -> None:
        self.attempts += 1
        self._running = None
        if isinstance(result, Failure):  # a bug in the code above: log, keep running
            self.log.failure("discovery: route {route}", result, route=self.route)
            self._schedule(DEFAULT_POLL_INTERVAL)

    def _schedule(self, interval: float) -> None:
        self._due = self.clock.seconds() + max(0.0, interval)
        self._wake()

    def _wake(self) -> None:
        if self._stopped:
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        now = self.clock.seconds()
        delay = min(max(0.0, self._due - now), max(0.01, self.provider.poll_interval))
        self._call = self.clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._call = None
        if self._stopped:
            return
        if self._running is None:
            due = self.clock.seconds() >= self._due
            try:
                changed = not due and self.provider.changed()
            except Exception:
                self.log.failure("discovery: route {route} change check", route=self.route)
                changed = False
            if due or changed:
                self.refresh_now()
                return  # the refresh schedules the next tick
        self._wake()


class Discovery(Service):
    """Every route's providers, and the shared ``Membership`` they keep current."""

    log = Logger()

    def __init__(
        self,
        routes: Mapping[str, Route],
        reactor: IDiscoveryReactor,
        *,
        membership: Membership | None = None,
        metrics: Any = None,
        build: Callable[[ProviderSpec, IDiscoveryReactor], IDiscoveryProvider] | None = None,
    ) -> None:
        self.routes = routes
        self.reactor = reactor
        self.membership = membership if membership is not None else Membership(routes)
        self.metrics = metrics
        build = build or build_provider
        self.runners: dict[str, list[ProviderRunner]] = {}
        for name, route in routes.items():
            if not route.providers:
                if metrics is not None:
                    metrics.discovery_targets.labels(name, "static").set(len(route.targets))
                continue
            runners = [
                ProviderRunner(
                    name, "static", StaticTargets(route.targets), reactor, _noop, metrics=metrics
                )
            ]
            for spec in route.providers:
                runners.append(
                    ProviderRunner(
                        name,
                        spec.name,
                        build(spec, reactor),
                        reactor,
                        partial(self._rebuild, name),
                        selector=route.selector,
                        metrics=metrics,
                    )
                )
            self.runners[name] = runners

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.start()

    def start(self) -> Deferred[None]:
        """Start every provider; fires once each has made its first attempt."""
        from twisted.internet.defer import gatherResults

        waits = []
        for name, runners in self.runners.items():
            for runner in runners:
                waits.append(runner.start())
            self._rebuild(name)
        return gatherResults(waits).addCallback(lambda _: None)

    def stopService(self) -> None:
        self.stop()
        super().stopService()  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        for runners in self.runners.values():
            for runner in runners:
                runner.stop()

    def settled(self) -> bool:
        """Has every provider made its first attempt?"""
        return all(r.attempts for runners in self.runners.values() for r in runners)

    def _rebuild(self, route: str) -> None:
        members: dict[str, Target] = {}
        for runner in self.runners[route]:
            for target in runner.targets:
                members.setdefault(target.address, target)
        self.membership.replace(route, members)


def _noop() -> None:
    pass


@implementer(IDiscoveryProvider)
class StaticTargets(BaseProvider):
    """The ``static`` provider: the configured list, labels and all, unchanging."""

    refresh_interval = 365 * 86400.0
    poll_interval = refresh_interval

    def __init__(self, targets: Iterable[Target]) -> None:
        self.targets = tuple(targets)

    def refresh(self) -> Discovered:
        return Discovered(self.targets)


# -- plugins ---------------------------------------------------------------------------------

_log = Logger()


def discovery_factories() -> dict[str, IDiscoveryProviderFactory]:
    """The installed third-party providers by name.

    Directories added to ``sys.path`` since ``twisted.plugins`` was imported are looked
    at too (``twisted.plugins`` computes its search path once, at import). Each plugin
    module is imported and its module-level providers collected, as
    ``twisted.plugin.getPlugins`` does, but without its ``dropin.cache``: that cache is
    written into every plugin folder, which may be a checkout or a read-only ``/etc``.
    """
    import importlib

    from twisted.plugin import pluginPackagePaths

    from twisted import plugins

    path = plugins.__path__
    for extra in pluginPackagePaths(plugins.__name__):
        if extra not in path:
            path.append(extra)
    stems = sorted({f.stem for d in path for f in Path(d).glob("*.py") if f.stem != "__init__"})
    found: dict[str, IDiscoveryProviderFactory] = {}
    for stem in stems:
        try:
            module = importlib.import_module(f"{plugins.__name__}.{stem}")
        except Exception:
            _log.failure("plugin module {module} failed to import", module=stem)
            continue
        for value in vars(module).values():
            if not IDiscoveryProviderFactory.providedBy(value):
                continue
            name = getattr(value, "name", None)
            if isinstance(name, str) and name not in found:
                found[name] = value
    return found


def build_provider(spec: ProviderSpec, reactor: IDiscoveryReactor) -> IDiscoveryProvider:
    """The provider a checked ``ProviderSpec`` describes."""
    if spec.kind == "file_sd":
        from promgate.discovery.file_sd import FileSD

        return FileSD.from_settings(spec.settings, reactor)
    if spec.kind == "dns_srv":
        from promgate.discovery.dns_srv import DNSSRV

        return DNSSRV.from_settings(spec.settings, reactor)
    if spec.kind == "plugin":
        factories = discovery_factories()
        factory = factories.get(spec.name)
        if factory is None:
            raise ValueError(f"no discovery plugin named {spec.name!r}")
        return factory.build(spec.settings, reactor, spec.base)
    raise ValueError(f"unknown discovery provider {spec.kind!r}")


def resolve_once(routes: Mapping[str, Route], reactor: IDiscoveryReactor) -> Deferred[Discovery]:
    """Run every provider once (``promgate check-config --resolve``)."""
    discovery = Discovery(routes, reactor)

    def done(_: object) -> Discovery:
        discovery.stop()
        return discovery

    return discovery.start().addCallback(done)


__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "BaseProvider",
    "CompiledSelector",
    "Discovered",
    "Discovery",
    "IDiscoveryProvider",
    "IDiscoveryProviderFactory",
    "ProviderRunner",
    "StaticTargets",
    "build_provider",
    "clean_labels",
    "discovery_factories",
    "resolve_once",
]
