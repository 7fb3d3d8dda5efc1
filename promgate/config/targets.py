"""A route's ``targets``: static targets, discovery providers, and the selector.

Static targets are taken as written. ``file_sd``, ``dns_srv`` and ``plugin`` providers are
checked here and run by ``promgate.discovery``; the selector (``match``, ``port``,
``address``) decides which discovered targets the route takes, and how their addresses
are rewritten.
"""

from __future__ import annotations

import glob
import ipaddress
import re
from collections.abc import Iterable
from typing import Any

from promgate.addresses import HOSTNAME, split_address
from promgate.config.fields import LABEL_NAME, Reader
from promgate.config.model import ProviderSpec, Selector, Target
from promgate.config.units import parse_duration
from promgate.config.yaml_source import Item, join_key

__all__ = ["check_targets"]

#: The keys of a route's ``targets``: providers, then the selector's.
_PROVIDERS = ("static", "file_sd", "dns_srv", "plugin")
_SELECTOR_KEYS = ("match", "port", "address")
_ADDRESS_FIELDS = re.compile(r"\{([^{}]*)\}")


def check_targets(r: Reader, item: Item) -> tuple[list[Target], tuple[ProviderSpec, ...], Selector]:
    """A route's static targets, its discovery providers and its selector."""
    f = r.fields(item, _PROVIDERS + _SELECTOR_KEYS)
    if f is None:
        return [], (), Selector()
    if not any(k in f for k in _PROVIDERS):
        r.error(item.src, item.key, f"give at least one of: {', '.join(_PROVIDERS)}")
    providers: list[ProviderSpec] = []
    if "file_sd" in f:
        providers.extend(_file_sd(r, f["file_sd"]))
    if "dns_srv" in f:
        providers.extend(_dns_srv(r, f["dns_srv"]))
    if "plugin" in f:
        providers.extend(_plugins(r, f["plugin"]))
    selector = _selector(r, f)
    if selector != Selector() and not providers:
        r.warn(item.src, item.key, "match/port/address apply to discovered targets only")
    return _static_targets(r, f), tuple(providers), selector


def _settings(
    r: Reader, item: Item, list_key: str, allowed: Iterable[str]
) -> dict[str, Item] | None:
    """A provider's settings: a bare list is short for ``{list_key: [...]}``."""
    if isinstance(item.value, list):
        return {list_key: item}
    f = r.fields(item, (list_key, *allowed), (list_key,))
    return f if f is not None and list_key in f else None


def _interval(r: Reader, f: dict[str, Item], key: str, out: dict[str, Any]) -> None:
    if key in f:
        value = r.positive(f[key], parse_duration)
        if value is not None:
            out[key] = value


def _file_sd(r: Reader, item: Item) -> list[ProviderSpec]:
    f = _settings(r, item, "files", ("refresh_interval", "poll_interval"))
    if f is None:
        return []
    patterns = r.strings(f["files"]) or []
    if not patterns:
        r.error(f["files"].src, f["files"].key, "name at least one file or glob")
        return []
    files = []
    for i, pattern in enumerate(patterns):
        key = f"{f['files'].key}[{i}]"
        if not pattern.endswith((".json", ".yml", ".yaml", "*")):
            r.error(f["files"].src, key, "file_sd files end in .json, .yml or .yaml")
        path = f["files"].src.resolve(pattern)
        if not glob.has_magic(pattern) and not path.parent.is_dir():
            r.warn(f["files"].src, key, f"directory {path.parent} does not exist (yet)")
        files.append(str(path))
    settings: dict[str, Any] = {"files": tuple(files)}
    _interval(r, f, "refresh_interval", settings)
    _interval(r, f, "poll_interval", settings)
    return [ProviderSpec("file_sd", "file_sd", settings, item.src.file.parent)]


def _dns_srv(r: Reader, item: Item) -> list[ProviderSpec]:
    f = _settings(r, item, "names", ("servers", "refresh_interval", "min_interval"))
    if f is None:
        return []
    names = r.strings(f["names"]) or []
    if not names:
        r.error(f["names"].src, f["names"].key, "name at least one SRV record")
    for i, name in enumerate(names):
        if not HOSTNAME.match(name):
            r.error(f["names"].src, f"{f['names'].key}[{i}]", f"{name!r}: not a DNS name")
    settings: dict[str, Any] = {"names": tuple(names)}
    if "servers" in f:
        servers = []
        for i, text in enumerate(r.strings(f["servers"]) or []):
            split = (text, 53) if _is_ip(text) else split_address(text)
            if split is None or not _is_ip(split[0]):
                r.error(
                    f["servers"].src,
                    f"{f['servers'].key}[{i}]",
                    f"{text!r}: give IP or IP:PORT ([v6]:port for IPv6)",
                )
            else:
                servers.append(split)
        settings["servers"] = tuple(servers)
    _interval(r, f, "refresh_interval", settings)
    _interval(r, f, "min_interval", settings)
    return [ProviderSpec("dns_srv", "dns_srv", settings, item.src.file.parent)]


def _plugins(r: Reader, item: Item) -> list[ProviderSpec]:
    from promgate.discovery import discovery_factories

    entries = r.one_or_many(item)
    try:
        factories = discovery_factories()
    except Exception as e:  # a broken plugin module: say so, not a traceback
        r.error(item.src, item.key, f"cannot load discovery plugins: {e}")
        return []
    out = []
    for entry in entries:
        if not isinstance(entry.value, dict) or not isinstance(entry.value.get("name"), str):
            r.error(entry.src, entry.key, "must be a mapping with a 'name'")
            continue
        name = entry.value["name"]
        factory = factories.get(name)
        if factory is None:
            known = ", ".join(sorted(factories)) or "none installed"
            r.error(
                entry.src,
                join_key(entry.key, "name"),
                f"no discovery plugin named {name!r} (known: {known})",
            )
            continue
        settings = {k: v for k, v in entry.value.items() if k != "name"}
        try:
            problems = list(factory.check(settings))
        except Exception as e:
            problems = [("", f"plugin {name!r} failed checking its settings: {e}")]
        for key, message in problems:
            r.error(entry.src, join_key(entry.key, key) if key else entry.key, message)
        if not problems:
            out.append(ProviderSpec("plugin", name, settings, entry.src.file.parent))
    return out


def _selector(r: Reader, f: dict[str, Item]) -> Selector:
    kw: dict[str, Any] = {}
    if "match" in f:
        m = f["match"]
        if not isinstance(m.value, dict):
            r.error(m.src, m.key, "must map label names to regular expressions")
        else:
            match = {}
            for name, rx in m.value.items():
                sub = join_key(m.key, str(name))
                if not isinstance(name, str) or not LABEL_NAME.match(name):
                    r.error(m.src, sub, "not a valid label name")
                elif not isinstance(rx, (str, int)) or isinstance(rx, bool):
                    r.error(m.src, sub, "must be a regular expression (a string)")
                else:
                    try:
                        re.compile(str(rx))
                    except re.error as e:
                        r.error(m.src, sub, f"not a valid regular expression: {e}")
                        continue
                    match[name] = str(rx)
            kw["match"] = match
    if "port" in f and "address" in f:
        r.error(f["address"].src, f["address"].key, "give port or address, not both")
    elif "port" in f:
        port = r.integer(f["port"], 1)
        if port is not None and port > 65535:
            r.error(f["port"].src, f["port"].key, "must be a port number (1-65535)")
        elif port is not None:
            kw["port"] = port
    elif "address" in f:
        text = r.string(f["address"])
        if text is not None:
            fields = _ADDRESS_FIELDS.findall(text)
            probe = _ADDRESS_FIELDS.sub("h", text.replace("{port}", "1"))
            if not fields or any(not LABEL_NAME.match(x) for x in fields):
                r.error(
                    f["address"].src,
                    f["address"].key,
                    'a template such as "{host}:9100" ({host}, {port}, {address} '
                    "or a label name in braces)",
                )
            elif split_address(probe) is None:
                r.error(f["address"].src, f["address"].key, "must make host:port")
            else:
                kw["address"] = text
    return Selector(**kw)


def _static_targets(r: Reader, f: dict[str, Item]) -> list[Target]:
    out: list[Target] = []
    if "static" not in f:
        return out
    static = f["static"]
    if not isinstance(static.value, list):
        r.error(
            static.src,
            static.key,
            "must be a list of host:port strings or {targets, labels} groups",
        )
        return out
    for i, entry in enumerate(static.value):
        key = f"{static.key}[{i}]"
        if isinstance(entry, dict):
            g = r.fields(Item(entry, static.src, key), ("targets", "labels"), ("targets",))
            if g is None or "targets" not in g:
                continue
            labels = r.labels(g["labels"]) if "labels" in g else {}
            if not isinstance(g["targets"].value, list):
                r.error(static.src, g["targets"].key, "must be a list of host:port strings")
            for j, addr in enumerate(
                g["targets"].value if isinstance(g["targets"].value, list) else []
            ):
                t = _target(r, Item(addr, static.src, f"{key}.targets[{j}]"), labels)
                if t:
                    out.append(t)
        else:
            t = _target(r, Item(entry, static.src, key), {})
            if t:
                out.append(t)
    seen: set[str] = set()
    for t in out:
        if t.address in seen:
            r.error(static.src, static.key, f"target {t.address} listed twice")
        seen.add(t.address)
    return out


def _target(r: Reader, item: Item, labels: dict[str, str]) -> Target | None:
    text = r.string(item)
    if text is None:
        return None
    if split_address(text) is None:
        r.error(item.src, item.key, f"target {text!r} must be host:port ([v6]:port for IPv6)")
        return None
    return Target(address=text, labels=labels)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
