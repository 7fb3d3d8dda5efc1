"""The endpoint descriptions a listener may give, read the same way by ``check-config`` and
by the listeners.

A listener's endpoint is a Twisted server endpoint string of kind ``tcp:``, ``tcp6:`` or
``unix:``; or ``systemd:`` for a socket systemd opened and passed on (socket activation,
``systemd:domain=INET:index=0`` or ``systemd:domain=INET6:name=scrape``); any of them may be
behind ``haproxy:``, for a front load balancer that starts every connection with a PROXY
protocol header (v1 or v2) naming the original client. ``ssl:`` and the rest are refused:
TLS is configured with ``tls``.
"""

from __future__ import annotations

import attrs

__all__ = [
    "BASE_KINDS",
    "PROXIED",
    "SYSTEMD_DOMAINS",
    "EndpointDescription",
    "SystemdSocket",
    "parse_endpoint",
]

#: The prefix of an endpoint whose connections start with a PROXY protocol header.
PROXIED = "haproxy:"
#: The kinds of endpoint a listener may give (after ``haproxy:``, if it says it).
BASE_KINDS = ("tcp", "tcp6", "unix", "systemd")
#: ``systemd:domain=``: the address families an inherited listening socket may have.
SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")
#: A systemd ``FileDescriptorName``: at most 255 characters, printable ASCII without ':'.
_MAX_NAME = 255


@attrs.frozen
class SystemdSocket:
    """``systemd:``: which socket passed by systemd, by position or by name."""

    domain: str = attrs.field(validator=attrs.validators.in_(SYSTEMD_DOMAINS))
    index: int | None = None
    name: str | None = None

    @property
    def shown(self) -> str:
        """How operators name it: ``index 0`` or ``name scrape``."""
        return f"index {self.index}" if self.name is None else f"name {self.name!r}"


@attrs.frozen
class EndpointDescription:
    """An endpoint description taken apart: what listens (``inner``, a Twisted endpoint
    string), of which kind, and whether a PROXY protocol header comes first."""

    text: str
    inner: str
    kind: str
    proxied: bool
    systemd: SystemdSocket | None = None


def parse_endpoint(text: str) -> EndpointDescription:
    """Take ``text`` apart; ValueError saying what is wrong. ``tcp:``, ``tcp6:`` and
    ``unix:`` are then parsed by Twisted (here only their kind is checked)."""
    proxied = text.startswith(PROXIED)
    inner = text[len(PROXIED) :] if proxied else text
    kind = inner.split(":", 1)[0]
    if kind not in BASE_KINDS:
        if proxied and kind == "haproxy":
            raise ValueError("haproxy: is given twice")
        raise ValueError(
            "endpoint must be tcp:, tcp6: or unix:, or systemd: (socket activation), "
            "optionally behind haproxy: (PROXY protocol) "
            "(TLS is configured with 'tls', not in the endpoint)"
        )
    systemd = _systemd(inner) if kind == "systemd" else None
    return EndpointDescription(text, inner, kind, proxied, systemd)


def _systemd(inner: str) -> SystemdSocket:
    """``systemd:domain=D:index=N`` or ``systemd:domain=D:name=NAME``."""
    if "\\" in inner:
        raise ValueError("systemd: endpoints take no escapes")
    options: dict[str, str] = {}
    for part in inner.split(":")[1:]:
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"systemd: {part!r} is not key=value")
        if key not in ("domain", "index", "name"):
            raise ValueError(f"systemd: unknown option {key!r} (domain, index or name)")
        if key in options:
            raise ValueError(f"systemd: {key} is given twice")
        options[key] = value
    domain = options.get("domain")
    if domain is None:
        raise ValueError("systemd: needs domain=INET, INET6 or UNIX")
    if domain not in SYSTEMD_DOMAINS:
        raise ValueError(f"systemd: domain {domain!r} must be INET, INET6 or UNIX")
    if ("index" in options) == ("name" in options):
        raise ValueError("systemd: needs exactly one of index=N and name=NAME")
    if "index" in options:
        index = options["index"]
        if not index.isdigit() or not index.isascii() or len(index) > 4:
            raise ValueError(f"systemd: index {index!r} must be a small non-negative number")
        return SystemdSocket(domain, index=int(index))
    name = options["name"]
    if not 0 < len(name) <= _MAX_NAME or not all(" " < c <= "~" for c in name):
        raise ValueError(
            f"systemd: name {name!r} must be 1-{_MAX_NAME} printable ASCII characters "
            "(systemd's FileDescriptorName)"
        )
    return SystemdSocket(domain, name=name)
