"""Load a configuration: YAML with drop-in includes, templates, and strict validation.

Every problem found is collected (not just the first), each with the file, line and key
path it concerns, so that ``promgate check-config`` and ``twistd promgate`` can print the
same complete list.
"""

from __future__ import annotations

import glob
import ipaddress
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from promgate.config.errors import ConfigError, Problem
from promgate.config.model import (
    DEFAULT_MAX_RESPONSE,
    DEFAULT_TIMEOUT,
    Admin,
    Audit,
    CertMatch,
    Config,
    Identity,
    Limits,
    Listener,
    Route,
    Target,
    TLSFiles,
    UpstreamTLS,
)
from promgate.config.units import parse_duration, parse_rate, parse_size

T = TypeVar("T")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_PORT = re.compile(r"[0-9]{1,5}")
_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")
_RESERVED_PARAMS = frozenset({"route", "target", "path"})

_TOP_KEYS = {"include", "tls", "admin", "listeners", "identities", "templates", "routes", "audit"}
_ROUTE_KEYS = {
    "scheme",
    "metrics_path",
    "paths",
    "params",
    "allow",
    "limits",
    "timeout",
    "max_response_size",
    "tls",
    "labels",
}
_LIMIT_PER = ("identity", "target", "identity_target")
_LATER_PROTOCOLS = {"forward", "tcp"}
_LATER_PROVIDERS = {"file_sd", "dns_srv"}


@attrs.frozen
class _Source:
    """One parsed YAML file and the line of every key path in it."""

    file: Path
    lines: dict[str, int]

    def line(self, key: str) -> int | None:
        while key:
            if key in self.lines:
                return self.lines[key]
            cut = max(key.rfind("."), key.rfind("["))
            key = key[:cut] if cut > 0 else ""
        return None

    def resolve(self, name: str) -> Path:
        try:
            path = Path(name).expanduser()
        except RuntimeError:  # "~user/..." naming no known user: keep it literal
            path = Path(name)
        return path if path.is_absolute() else self.file.parent / path


@attrs.frozen
class _Item:
    """A value with where it came from."""

    value: Any
    src: _Source
    key: str


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


class _YAML:
    """Turns a YAML node tree into plain values while noting each key's line."""

    def __init__(self, file: Path, problems: list[Problem]) -> None:
        self.file = file
        self.problems = problems
        self.lines: dict[str, int] = {}
        self._scalars = yaml.constructor.SafeConstructor()

    def convert(self, node: yaml.Node, path: str) -> Any:
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                if knode.tag == "tag:yaml.org,2002:merge":
                    self.problems.append(
                        Problem(
                            self.file,
                            knode.start_mark.line + 1,
                            path,
                            "YAML merge keys (<<) are not supported",
                        )
                    )
                    continue
                key = (
                    self._scalars.construct_object(knode)
                    if isinstance(knode, yaml.ScalarNode)
                    else None
                )
                if not isinstance(key, str):
                    self.problems.append(
                        Problem(
                            self.file,
                            knode.start_mark.line + 1,
                            path,
                            "mapping keys must be strings",
                        )
                    )
                    continue
                sub = _join(path, key)
                if key in out:
                    self.problems.append(
                        Problem(
                            self.file,
                            knode.start_mark.line + 1,
                            sub,
                            "duplicate key in the same mapping",
                        )
                    )
                    continue
                self.lines[sub] = knode.start_mark.line + 1
                out[key] = self.convert(vnode, sub)
            return out
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, child in enumerate(node.value):
                sub = f"{path}[{i}]"
                self.lines[sub] = child.start_mark.line + 1
                items.append(self.convert(child, sub))
            return items
        return self._scalars.construct_object(node)


def _parse_file(file: Path, problems: list[Problem]) -> tuple[Any, _Source] | None:
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        problems.append(Problem(file, None, "", f"cannot read file: {e.strerror or e}"))
        return None
    except UnicodeDecodeError:
        problems.append(Problem(file, None, "", "file is not UTF-8 text"))
        return None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        problems.append(Problem(file, None, "", "YAML error: nested too deeply"))
        return None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        problems.append(Problem(file, line, "", f"YAML syntax error: {e.problem or e}"))
        return None
    except yaml.YAMLError as e:
        problems.append(Problem(file, None, "", f"YAML error: {e}"))
        return None
    conv = _YAML(file, problems)
    try:
        data = conv.convert(node, "") if node is not None else {}
    except yaml.YAMLError as e:
        problems.append(Problem(file, None, "", f"YAML error: {e}"))
        return None
    except RecursionError:
        problems.append(
            Problem(file, None, "", "YAML error: nested too deeply (or a recursive alias)")
        )
        return None
    return data, _Source(file, conv.lines)


class _Loader:
    """Collects sections from the main file and its drop-ins, then validates them."""

    def __init__(self, main: Path) -> None:
        self.main = main
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self.files: list[Path] = []
        self.singletons: dict[str, _Item] = {}
        self.listeners: list[_Item] = []
        self.named: dict[str, dict[str, _Item]] = {"identities": {}, "templates": {}, "routes": {}}

    # -- reporting -------------------------------------------------------------------

    def error(self, src: _Source | None, key: str, message: str) -> None:
        file = src.file if src else self.main
        problem = Problem(file, src.line(key) if src else None, key, message)
        # A template is checked once per route using it: report each problem once.
        if problem not in self.errors:
            self.errors.append(problem)

    def warn(self, src: _Source | None, key: str, message: str) -> None:
        file = src.file if src else self.main
        problem = Problem(file, src.line(key) if src else None, key, message)
        if problem not in self.warnings:
            self.warnings.append(problem)

    # -- reading files ---------------------------------------------------------------

    def read(self, file: Path, seen: set[Path]) -> None:
        real = file.resolve()
        if real in seen:
            return
        seen.add(real)
        parsed = _parse_file(file, self.errors)
        if parsed is None:
            return
        data, src = parsed
        self.files.append(file)
        if not isinstance(data, dict):
            self.error(src, "", "the top level must be a mapping")
            return
        for key in data:
            if key not in _TOP_KEYS:
                self.error(
                    src, key, f"unknown key (expected one of: {', '.join(sorted(_TOP_KEYS))})"
                )
        for key in ("tls", "admin", "audit"):
            if key in data:
                if key in self.singletons:
                    first = self.singletons[key]
                    self.error(
                        src, key, f"defined twice (first at {first.src.file}:{first.src.line(key)})"
                    )
                else:
                    self.singletons[key] = _Item(data[key], src, key)
        if "listeners" in data:
            listeners = data["listeners"]
            if not isinstance(listeners, list):
                self.error(src, "listeners", "must be a list")
            else:
                self.listeners.extend(
                    _Item(v, src, f"listeners[{i}]") for i, v in enumerate(listeners)
                )
        for section, table in self.named.items():
            if section not in data:
                continue
            entries = data[section]
            if entries is None:
                continue
            if not isinstance(entries, dict):
                self.error(src, section, "must be a mapping of names")
                continue
            for name, value in entries.items():
                key = f"{section}.{name}"
                if not _NAME.match(name):
                    self.error(src, key, "names use letters, digits, '_', '.', '-' (at most 63)")
                if name in table:
                    first = table[name]
                    self.error(
                        src,
                        key,
                        f"defined twice (first at {first.src.file}:{first.src.line(first.key)})",
                    )
                    continue
                table[name] = _Item(value, src, key)
        for pattern_item in self._includes(data, src):
            self.read(pattern_item, seen)

    def _includes(self, data: dict[str, Any], src: _Source) -> Iterable[Path]:
        includes = data.get("include", [])
        if isinstance(includes, str):
            includes = [includes]
        if not isinstance(includes, list):
            self.error(src, "include", "must be a list of file names or globs")
            return
        for i, pattern in enumerate(includes):
            key = f"include[{i}]"
            if not isinstance(pattern, str) or not pattern:
                self.error(src, key, "must be a file name or glob")
                continue
            full = src.resolve(pattern)
            if glob.has_magic(pattern):
                yield from (Path(p) for p in sorted(glob.glob(str(full))))
            elif not full.is_file():
                self.error(src, key, f"included file {full} does not exist")
            else:
                yield full

    # -- typed field helpers -----------------------------------------------------------

    def fields(
        self, item: _Item, allowed: Iterable[str], required: Iterable[str] = ()
    ) -> dict[str, _Item] | None:
        if not isinstance(item.value, dict):
            self.error(item.src, item.key, "must be a mapping")
            return None
        allowed = set(allowed)
        out = {}
        for key, value in item.value.items():
            sub = _join(item.key, key)
            if key not in allowed:
                self.error(
                    item.src, sub, f"unknown key (expected one of: {', '.join(sorted(allowed))})"
                )
            else:
                out[key] = _Item(value, item.src, sub)
        for key in required:
            if key not in item.value:
                self.error(item.src, item.key, f"missing required key {key!r}")
        return out

    def typed(self, item: _Item, convert: Callable[[Any], T]) -> T | None:
        try:
            return convert(item.value)
        except (ValueError, TypeError) as e:
            self.error(item.src, item.key, str(e))
            return None

    def string(self, item: _Item) -> str | None:
        if not isinstance(item.value, str) or not item.value:
            self.error(item.src, item.key, "must be a non-empty string")
            return None
        return item.value

    def strings(self, item: _Item) -> list[str] | None:
        if not isinstance(item.value, list):
            self.error(item.src, item.key, "must be a list of strings")
            return None
        out = []
        for i, v in enumerate(item.value):
            s = self.string(_Item(v, item.src, f"{item.key}[{i}]"))
            if s is not None:
                out.append(s)
        return out

    def integer(self, item: _Item, minimum: int) -> int | None:
        value = item.value
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.error(item.src, item.key, f"must be an integer >= {minimum}")
            return None
        return value

    def choice(self, item: _Item, choices: Iterable[str]) -> str | None:
        choices = tuple(choices)
        if item.value not in choices:
            self.error(item.src, item.key, f"must be one of: {', '.join(choices)}")
            return None
        return str(item.value)

    def duration(self, item: _Item) -> float | None:
        return self.typed(item, parse_duration)

    def positive(self, item: _Item, convert: Callable[[Any], T]) -> T | None:
        """Convert, then refuse zero: a zero timeout, size or interval is never meant."""
        value = self.typed(item, convert)
        if value is not None and not value:
            self.error(item.src, item.key, "must be greater than zero")
            return None
        return value

    def existing_file(self, item: _Item) -> Path | None:
        name = self.string(item)
        if name is None:
            return None
        path = item.src.resolve(name)
        if not path.is_file():
            self.error(item.src, item.key, f"file {path} does not exist")
            return None
        return path

    def labels(self, item: _Item) -> dict[str, str]:
        if not isinstance(item.value, dict):
            self.error(item.src, item.key, "must be a mapping of label names to values")
            return {}
        out = {}
        for name, value in item.value.items():
            sub = _join(item.key, name)
            if not _LABEL.match(name) or name.startswith("__"):
                self.error(
                    item.src, sub, "not a valid label name (and names starting __ are reserved)"
                )
            elif not isinstance(value, (str, int, float)) or isinstance(value, bool):
                self.error(item.src, sub, "label values must be strings")
            else:
                out[name] = str(value)
        return out

    def endpoint(self, item: _Item) -> str | None:
        text = self.string(item)
        if text is None:
            return None
        kind = text.split(":", 1)[0]
        if kind not in ("tcp", "tcp6", "unix"):
            self.error(
                item.src,
                item.key,
                "endpoint must be tcp:, tcp6: or unix: "
                "(TLS is configured with 'tls', not in the endpoint)",
            )
            return None
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.testing import MemoryReactor

        try:
            serverFromString(MemoryReactor(), text)
        except (ValueError, TypeError, KeyError, RuntimeError) as e:  # "tcp:1\\": RuntimeError
            self.error(item.src, item.key, f"invalid endpoint {text!r}: {e}")
            return None
        return text

    # -- sections ----------------------------------------------------------------------

    def tls_files(self, item: _Item) -> TLSFiles | None:
        f = self.fields(
            item, ("certificate", "key", "client_ca"), ("certificate", "key", "client_ca")
        )
        if f is None or len(f) < 3:
            return None
        cert_path = self.existing_file(f["certificate"])
        key_path = self.existing_file(f["key"])
        ca_path = self.existing_file(f["client_ca"])
        if cert_path is None or key_path is None or ca_path is None:
            return None
        certs = self._certificates(f["certificate"], cert_path)
        key = self._private_key(f["key"], key_path)
        self._certificates(f["client_ca"], ca_path)
        if (
            certs
            and key is not None
            and certs[0]
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            != key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ):
            self.error(
                f["key"].src,
                f["key"].key,
                f"key {key_path} does not match certificate {cert_path}",
            )
        return TLSFiles(cert_path, key_path, ca_path)

    def _certificates(self, item: _Item, path: Path) -> list[x509.Certificate]:
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except (ValueError, OSError) as e:
            self.error(item.src, item.key, f"{path}: not a PEM certificate ({e})")
            return []
        import datetime

        now = datetime.datetime.now(datetime.timezone.utc)
        for cert in certs:
            if cert.not_valid_after_utc < now:
                self.warn(
                    item.src,
                    item.key,
                    f"{path}: certificate {cert.subject.rfc4514_string()} has expired",
                )
        return certs

    def _private_key(self, item: _Item, path: Path) -> Any:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as e:
            self.error(item.src, item.key, f"{path}: not an unencrypted PEM private key ({e})")
            return None
        if not isinstance(
            key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)
        ):
            self.error(item.src, item.key, f"{path}: unsupported key type")
            return None
        return key

    def listener(
        self, item: _Item, default_tls: TLSFiles | None, have_tls: bool
    ) -> Listener | None:
        f = self.fields(
            item, ("name", "protocol", "endpoint", "advertise", "tls"), ("name", "endpoint")
        )
        if f is None:
            return None
        name = self.string(f["name"]) if "name" in f else None
        if name is not None and not _NAME.match(name):
            self.error(
                item.src, f["name"].key, "names use letters, digits, '_', '.', '-' (at most 63)"
            )
        protocol = "http"
        if "protocol" in f:
            if isinstance(f["protocol"].value, str) and f["protocol"].value in _LATER_PROTOCOLS:
                self.error(
                    item.src,
                    f["protocol"].key,
                    f"protocol {f['protocol'].value!r} is not available in this version",
                )
                return None
            protocol = self.choice(f["protocol"], ("http",)) or "http"
        endpoint = self.endpoint(f["endpoint"]) if "endpoint" in f else None
        advertise = None
        if "advertise" in f:
            advertise = self.string(f["advertise"])
            if advertise is not None and _split_address(advertise) is None:
                self.error(item.src, f["advertise"].key, "must be host:port")
        tls = default_tls
        if "tls" in f:
            if f["tls"].value is False:
                tls = None
                self.warn(
                    item.src,
                    f["tls"].key,
                    "plain-text listener: no TLS, no client certificates, no identities",
                )
            elif isinstance(f["tls"].value, dict):
                tls = self.tls_files(f["tls"])
            else:
                self.error(
                    item.src,
                    f["tls"].key,
                    "must be false or a mapping with certificate, key and client_ca",
                )
        elif not have_tls:
            self.error(
                item.src,
                item.key,
                "no top-level 'tls' section; give this listener 'tls' or say 'tls: false'",
            )
        if name is None or endpoint is None:
            return None
        return Listener(
            name=name, protocol=protocol, endpoint=endpoint, tls=tls, advertise=advertise
        )

    def identity(self, name: str, item: _Item) -> Identity | None:
        f = self.fields(item, ("cert", "roles"))
        if f is None:
            return None
        matches: list[CertMatch] = []
        if "cert" in f:
            raw = f["cert"].value
            entries = raw if isinstance(raw, list) else [raw]
            for i, entry in enumerate(entries):
                key = f"{f['cert'].key}[{i}]" if isinstance(raw, list) else f["cert"].key
                sub = self.fields(_Item(entry, item.src, key), ("cn", "dns", "uri"))
                if sub is None:
                    continue
                if len(sub) != 1:
                    self.error(item.src, key, "give exactly one of cn, dns, uri")
                    continue
                ((kind, value),) = sub.items()
                text = self.string(value)
                if text is not None:
                    matches.append(CertMatch(**{kind: text}))
        else:
            self.warn(item.src, item.key, "identity has no credential and can never match")
        roles = frozenset(self.strings(f["roles"]) or ()) if "roles" in f else frozenset()
        return Identity(name=name, cert=tuple(matches), roles=roles)

    def route(self, name: str, item: _Item, templates: dict[str, _Item]) -> Route | None:
        allowed = _ROUTE_KEYS | {"template", "targets"}
        own = self.fields(item, allowed, ("targets",))
        if own is None:
            return None
        merged: dict[str, _Item] = {}
        if "template" in own:
            tname = self.string(own["template"])
            if tname is not None:
                if tname not in templates:
                    self.error(item.src, own["template"].key, f"undefined template {tname!r}")
                else:
                    tfields = self.fields(templates[tname], _ROUTE_KEYS) or {}
                    merged.update(tfields)
        merged.update({k: v for k, v in own.items() if k != "template"})

        kw: dict[str, Any] = {}
        if "scheme" in merged:
            kw["scheme"] = self.choice(merged["scheme"], ("http", "https")) or "http"
        if "metrics_path" in merged:
            kw["metrics_path"] = self.upstream_path(merged["metrics_path"])
        metrics_path = kw.get("metrics_path") or "/metrics"
        paths = [metrics_path]
        if "paths" in merged:
            for i, p in enumerate(
                merged["paths"].value if isinstance(merged["paths"].value, list) else []
            ):
                checked = self.upstream_path(
                    _Item(p, merged["paths"].src, f"{merged['paths'].key}[{i}]")
                )
                if checked and checked not in paths:
                    paths.append(checked)
            if not isinstance(merged["paths"].value, list):
                self.error(merged["paths"].src, merged["paths"].key, "must be a list of paths")
        kw["paths"] = tuple(paths)
        kw["metrics_path"] = metrics_path
        if "params" in merged:
            params = self.strings(merged["params"]) or []
            for p in params:
                if p in _RESERVED_PARAMS:
                    self.error(
                        merged["params"].src,
                        merged["params"].key,
                        f"parameter {p!r} is the gateway's own",
                    )
            kw["params"] = tuple(p for p in params if p not in _RESERVED_PARAMS)
        if "allow" in merged:
            kw["allow"] = tuple(self.strings(merged["allow"]) or ())
            self._allow_refs.append((merged["allow"], kw["allow"]))
        else:
            self.warn(
                item.src, item.key, "route has no 'allow' list; nobody may use it (deny by default)"
            )
        if "limits" in merged:
            lim = self.limits(merged["limits"])
            if lim is not None:
                kw["limits"] = lim
        if "timeout" in merged:
            kw["timeout"] = self.positive(merged["timeout"], parse_duration) or DEFAULT_TIMEOUT
        if "max_response_size" in merged:
            kw["max_response_size"] = (
                self.positive(merged["max_response_size"], parse_size) or DEFAULT_MAX_RESPONSE
            )
        if "tls" in merged:
            t = self.fields(merged["tls"], ("ca", "server_name"))
            if t is not None:
                ca = self.existing_file(t["ca"]) if "ca" in t else None
                if ca is not None:
                    self._certificates(t["ca"], ca)
                server_name = self.string(t["server_name"]) if "server_name" in t else None
                kw["upstream_tls"] = UpstreamTLS(ca=ca, server_name=server_name)
                if kw.get("scheme") != "https":
                    self.warn(
                        merged["tls"].src,
                        merged["tls"].key,
                        "tls settings are ignored unless scheme is https",
                    )
        if "labels" in merged:
            kw["labels"] = self.labels(merged["labels"])
        targets = self.targets(merged["targets"]) if "targets" in merged else []
        return Route(name=name, targets=tuple(targets), **kw)

    def upstream_path(self, item: _Item) -> str | None:
        path = self.string(item)
        if path is None:
            return None
        segments = path.split("/")
        if (
            not _PATH.match(path)
            or "//" in path
            or any(s in (".", "..") for s in segments)
            or ";" in path
        ):
            self.error(
                item.src,
                item.key,
                "must be an absolute path with no '.', '..', '//', ';', '?' or '%'",
            )
            return None
        return path

    def limits(self, item: _Item) -> Limits | None:
        f = self.fields(item, ("rate", "burst", "per", "max_concurrent"))
        if f is None:
            return None
        rate = self.typed(f["rate"], parse_rate) if "rate" in f else None
        burst = self.integer(f["burst"], 1) if "burst" in f else None
        per = self.choice(f["per"], _LIMIT_PER) if "per" in f else None
        conc = self.integer(f["max_concurrent"], 1) if "max_concurrent" in f else None
        return Limits(
            rate=rate,
            burst=burst if burst is not None else (max(1, int(rate)) if rate else 1),
            per=per or "identity_target",
            max_concurrent=conc,
        )

    def targets(self, item: _Item) -> list[Target]:
        f = self.fields(item, {"static"} | _LATER_PROVIDERS)
        if f is None:
            return []
        out: list[Target] = []
        for provider in _LATER_PROVIDERS & f.keys():
            self.error(
                item.src,
                f[provider].key,
                f"discovery provider {provider!r} is not available in this version",
            )
        if "static" not in f:
            return out
        static = f["static"]
        if not isinstance(static.value, list):
            self.error(
                static.src,
                static.key,
                "must be a list of host:port strings or {targets, labels} groups",
            )
            return out
        for i, entry in enumerate(static.value):
            key = f"{static.key}[{i}]"
            if isinstance(entry, dict):
                g = self.fields(_Item(entry, static.src, key), ("targets", "labels"), ("targets",))
                if g is None or "targets" not in g:
                    continue
                labels = self.labels(g["labels"]) if "labels" in g else {}
                if not isinstance(g["targets"].value, list):
                    self.error(static.src, g["targets"].key, "must be a list of host:port strings")
                for j, addr in enumerate(
                    g["targets"].value if isinstance(g["targets"].value, list) else []
                ):
                    t = self.target(_Item(addr, static.src, f"{key}.targets[{j}]"), labels)
                    if t:
                        out.append(t)
            else:
                t = self.target(_Item(entry, static.src, key), {})
                if t:
                    out.append(t)
        seen: set[str] = set()
        for t in out:
            if t.address in seen:
                self.error(static.src, static.key, f"target {t.address} listed twice")
            seen.add(t.address)
        return out

    def target(self, item: _Item, labels: dict[str, str]) -> Target | None:
        text = self.string(item)
        if text is None:
            return None
        if _split_address(text) is None:
            self.error(
                item.src, item.key, f"target {text!r} must be host:port ([v6]:port for IPv6)"
            )
            return None
        return Target(address=text, labels=labels)

    def audit(self, item: _Item) -> Audit | None:
        f = self.fields(
            item,
            ("path", "key_file", "fsync", "fsync_interval", "on_failure", "max_field_length"),
            ("path", "key_file"),
        )
        if f is None or "path" not in f or "key_file" not in f:
            return None
        name = self.string(f["path"])
        path = f["path"].src.resolve(name) if name else None
        if path is not None and not path.parent.is_dir():
            self.error(f["path"].src, f["path"].key, f"directory {path.parent} does not exist")
        key_file = self.existing_file(f["key_file"])
        if key_file is not None:
            try:
                if not key_file.read_text().strip():
                    self.error(f["key_file"].src, f["key_file"].key, f"{key_file} is empty")
                elif key_file.stat().st_mode & 0o077:
                    self.warn(
                        f["key_file"].src,
                        f["key_file"].key,
                        f"{key_file} is readable by others; chmod 600 it",
                    )
            except (OSError, UnicodeDecodeError) as e:
                self.error(f["key_file"].src, f["key_file"].key, f"cannot read {key_file}: {e}")
        kw: dict[str, Any] = {}
        if "fsync" in f:
            kw["fsync"] = self.choice(f["fsync"], ("always", "interval", "never")) or "interval"
        if "fsync_interval" in f:
            kw["fsync_interval"] = self.positive(f["fsync_interval"], parse_duration) or 1.0
        if "on_failure" in f:
            kw["on_failure"] = self.choice(f["on_failure"], ("deny", "allow")) or "deny"
        if "max_field_length" in f:
            kw["max_field_length"] = self.integer(f["max_field_length"], 16) or 1024
        if path is None or key_file is None:
            return None
        return Audit(path=path, key_file=key_file, **kw)

    # -- whole configuration -------------------------------------------------------------

    def build(self) -> Config | None:
        self._allow_refs: list[tuple[_Item, tuple[str, ...]]] = []
        tls = self.tls_files(self.singletons["tls"]) if "tls" in self.singletons else None
        admin = Admin()
        if "admin" in self.singletons:
            f = self.fields(self.singletons["admin"], ("endpoint",))
            if f and "endpoint" in f:
                endpoint = self.endpoint(f["endpoint"])
                if endpoint is not None:
                    admin = Admin(endpoint=endpoint)
        listeners: list[Listener] = []
        names: dict[str, _Item] = {}
        for item in self.listeners:
            lst = self.listener(item, tls, "tls" in self.singletons)
            if lst is None:
                continue
            if lst.name in names:
                first = names[lst.name]
                self.error(
                    item.src,
                    f"{item.key}.name",
                    f"listener {lst.name!r} defined twice "
                    f"(first at {first.src.file}:{first.src.line(first.key)})",
                )
                continue
            names[lst.name] = item
            listeners.append(lst)
        if not self.listeners:
            self.error(None, "listeners", "no listeners defined")
        identities = {}
        for name, item in self.named["identities"].items():
            ident = self.identity(name, item)
            if ident is not None:
                identities[name] = ident
        for item in self.named["templates"].values():
            self.fields(item, _ROUTE_KEYS)
        routes = {}
        for name, item in self.named["routes"].items():
            route = self.route(name, item, self.named["templates"])
            if route is not None:
                routes[name] = route
        roles = {r for i in identities.values() for r in i.roles}
        for item, allow in self._allow_refs:
            for entry in allow:
                if entry.startswith("role:"):
                    if entry[5:] not in roles:
                        self.warn(item.src, item.key, f"no identity carries role {entry[5:]!r}")
                elif entry not in self.named["identities"]:
                    self.error(item.src, item.key, f"undefined identity {entry!r}")
        audit = None
        if "audit" in self.singletons:
            audit = self.audit(self.singletons["audit"])
        else:
            self.error(
                None, "audit", "missing: every gateway keeps an audit log (give path and key_file)"
            )
        if self.errors or audit is None:
            return None
        return Config(
            source=self.main,
            listeners=tuple(listeners),
            identities=identities,
            routes=routes,
            admin=admin,
            audit=audit,
            files=tuple(self.files),
            warnings=tuple(str(w) for w in self.warnings),
        )


def _split_address(text: str) -> tuple[str, int] | None:
    """Split ``host:port`` (``[v6]:port`` for IPv6) or return None if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
        return host[1:-1], int(port)
    if ":" in host:
        return None
    try:
        ipaddress.IPv4Address(host)
        return host, int(port)
    except ValueError:
        pass
    if not _HOSTNAME.match(host) or host.replace(".", "").isdigit():
        return None
    return host, int(port)


split_address = _split_address


def check_config(path: str | Path) -> tuple[Config | None, list[Problem], list[Problem]]:
    """Load and validate ``path``; return the config (None if invalid), errors, warnings."""
    main = Path(path)
    loader = _Loader(main)
    loader.read(main, set())
    config = loader.build() if loader.files else None
    return config, loader.errors, loader.warnings


def load_config(path: str | Path) -> Config:
    """Load and validate ``path`` or raise ConfigError listing every problem."""
    config, errors, _ = check_config(path)
    if config is None:
        raise ConfigError(errors or [Problem(Path(path), None, "", "configuration is invalid")])
    return config
