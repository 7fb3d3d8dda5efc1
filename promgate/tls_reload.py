"""Server TLS that follows its files: certificates rotated and clients revoked while the
gateway runs, without dropping a connection.

Each TLS listener serves through one :class:`ReloadingServerTLS`. It makes every new
connection from the set of files loaded last (certificate, key, client CA, client CRL), so
swapping the set changes new handshakes only: a connection keeps the context it was made
with until it ends. :class:`CertificateWatch` polls the files every couple of seconds
(a ``stat`` of each; a changed file is read and hashed once it has stopped changing for one
interval, so a certificate and key written one after the other are taken together). A new
set is served only if it is whole: every file readable and parsed, the key the
certificate's, the certificate neither expired nor not yet valid, every CRL signed by a
client CA and not past its next update. Otherwise the set served so far stays, the reason
is logged, and ``promgate_tls_reload_failures_total`` counts it, once per change.

Sessions are never resumed (see :func:`promgate.tls.options_from`), so no client skips
the checks of the set served when it connects.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from promgate.certificates import crl_signed_by
from promgate.config.model import TLSFiles
from promgate.metrics import TLSMetrics
from promgate.tls import ServerTLS, load_crls, options_from

__all__ = [
    "MAX_FILE_SIZE",
    "POLL_INTERVAL",
    "CertificateWatch",
    "ReloadResult",
    "ReloadingServerTLS",
    "ServedSet",
    "TLSFilesError",
]

#: How often the files are looked at, in seconds.
POLL_INTERVAL = 2.0
#: A TLS file larger than this is refused rather than read (a bundle of a few hundred CA
#: certificates, or a CRL of some thousand entries, is far smaller).
MAX_FILE_SIZE = 4 * 1024 * 1024

_PRIVATE_KEYS = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)

#: What ``stat`` says of one file: (device, inode, size, mtime in ns, ctime in ns), or
#: None when it cannot be stat'ed.
_Stat = tuple[int, int, int, int, int] | None


class TLSFilesError(ValueError):
    """A set of TLS files that cannot be served; the message says which file and why."""


@attrs.frozen
class ServedSet:
    """One loaded set of TLS files: the connection creator made from it, a digest of the
    files' bytes, and what the certificate served is."""

    tls: ServerTLS = attrs.field(eq=False)
    digest: str
    certificate_sha256: str
    not_after: datetime.datetime


@attrs.frozen
class ReloadResult:
    """How a reload went: ``ok`` when the set served is the files' current one (loaded
    now, or unchanged), with a message for the operator."""

    ok: bool
    message: str
    changed: bool = False


def _paths(files: TLSFiles) -> list[tuple[str, Path]]:
    named = [
        ("certificate", files.certificate),
        ("key", files.key),
        ("client_ca", files.client_ca),
    ]
    if files.client_crl is not None:
        named.append(("client_crl", files.client_crl))
    return named


def _stat(path: Path) -> _Stat:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read(name: str, path: Path) -> bytes:
    """A file's bytes, at most MAX_FILE_SIZE of them."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except OSError as e:
        raise TLSFilesError(f"{name} {path}: {e.strerror or e}") from e
    if len(data) > MAX_FILE_SIZE:
        raise TLSFilesError(f"{name} {path}: larger than {MAX_FILE_SIZE} bytes")
    if not data.strip():
        raise TLSFilesError(f"{name} {path}: empty")
    return data


def read_files(files: TLSFiles) -> dict[str, bytes]:
    """The bytes of each file of the set, by its key (``certificate``, ``key``, ...)."""
    return {name: _read(name, path) for name, path in _paths(files)}


def _digest(contents: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(contents):
        h.update(name.encode() + b"\0" + len(contents[name]).to_bytes(8, "big"))
        h.update(contents[name])
    return h.hexdigest()


def _spki(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def build_set(
    files: TLSFiles,
    contents: dict[str, bytes],
    *,
    now: datetime.datetime | None,
    alpn: Sequence[bytes] | None,
) -> ServedSet:
    """Parse and check a set of TLS files and make its server context.

    ``now`` given, the certificate must be valid then and every CRL current (a reload);
    None skips those two checks (start-up, where check-config has already warned).
    Raises TLSFilesError saying which file is wrong and why.
    """
    try:
        chain = x509.load_pem_x509_certificates(contents["certificate"])
    except ValueError as e:
        raise TLSFilesError(f"certificate {files.certificate}: not a PEM certificate ({e})") from e
    try:
        key = serialization.load_pem_private_key(contents["key"], password=None)
    except (ValueError, TypeError) as e:
        raise TLSFilesError(f"key {files.key}: not an unencrypted PEM private key ({e})") from e
    if not isinstance(key, _PRIVATE_KEYS):
        raise TLSFilesError(f"key {files.key}: unsupported key type")
    leaf = chain[0]
    if _spki(key) != _spki(leaf):
        raise TLSFilesError(f"key {files.key} does not match certificate {files.certificate}")
    try:
        cas = x509.load_pem_x509_certificates(contents["client_ca"])
    except ValueError as e:
        raise TLSFilesError(f"client_ca {files.client_ca}: not a PEM certificate ({e})") from e
    crls: list[x509.CertificateRevocationList] = []
    if "client_crl" in contents:
        try:
            crls = load_crls(contents["client_crl"])
        except ValueError as e:
            raise TLSFilesError(
                f"client_crl {files.client_crl}: not a PEM certificate revocation list ({e})"
            ) from e
        for crl in crls:
            if not any(crl_signed_by(crl, ca) for ca in cas):
                raise TLSFilesError(
                    f"client_crl {files.client_crl}: the CRL of "
                    f"{crl.issuer.rfc4514_string()} is not signed by a client_ca CA"
                )
    if now is not None:
        _check_times(files, leaf, crls, now)
    try:
        options = options_from(chain, key, cas, crls, alpn=alpn)
        tls = ServerTLS(options)
    except (SSL.Error, ValueError, TypeError) as e:
        raise TLSFilesError(f"OpenSSL refused the set: {e}") from e
    return ServedSet(
        tls=tls,
        digest=_digest(contents),
        certificate_sha256=leaf.fingerprint(hashes.SHA256()).hex(),
        not_after=leaf.not_valid_after_utc,
    )


def _check_times(
    files: TLSFiles,
    leaf: x509.Certificate,
    crls: Iterable[x509.CertificateRevocationList],
    now: datetime.datetime,
) -> None:
    if leaf.not_valid_after_utc <= now:
        raise TLSFilesError(
            f"certificate {files.certificate}: expired at {leaf.not_valid_after_utc.isoformat()}"
        )
    if leaf.not_valid_before_utc > now:
        raise TLSFilesError(
            f"certificate {files.certificate}: not valid before "
            f"{leaf.not_valid_before_utc.isoformat()}"
        )
    for crl in crls:
        next_update = crl.next_update_utc
        if next_update is not None and next_update <= now:
            raise TLSFilesError(
                f"client_crl {files.client_crl}: the CRL of {crl.issuer.rfc4514_string()} "
                f"is past its next update ({next_update.isoformat()})"
            )
        if crl.last_update_utc > now:
            raise TLSFilesError(
                f"client_crl {files.client_crl}: the CRL of {crl.issuer.rfc4514_string()} "
                f"is not valid before {crl.last_update_utc.isoformat()}"
            )


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingServerTLS:
    """The connection creator of one TLS listener: each new connection is made from the
    set of files loaded last; :meth:`poll` and :meth:`reload` load a changed set."""

    log = Logger()

    def __init__(
        self,
        listener: str,
        files: TLSFiles,
        served: ServedSet,
        stats: tuple[_Stat, ...],
        *,
        clock: IReactorTime,
        alpn: Sequence[bytes] | None,
        metrics: TLSMetrics | None = None,
    ) -> None:
        self.listener = listener
        self.files = files
        self._served = served
        self._clock = clock
        self._alpn = alpn
        self._metrics = metrics
        #: The files' stat at the last poll, and at the last load (or attempt).
        self._seen = self._tried = stats
        if metrics is not None:
            metrics.listener(listener, served.not_after.timestamp())

    @classmethod
    def load(
        cls,
        listener: str,
        files: TLSFiles,
        *,
        clock: IReactorTime,
        alpn: Sequence[bytes] | None = (b"http/1.1",),
        metrics: TLSMetrics | None = None,
    ) -> ReloadingServerTLS:
        """Read ``files`` and serve them (start-up: an expired certificate or CRL is served
        as before, check-config having warned of it). Raises OSError if a file cannot be
        read, ValueError (TLSFilesError) if the set cannot be served."""
        stats = tuple(_stat(path) for _, path in _paths(files))
        contents = {name: path.read_bytes() for name, path in _paths(files)}
        served = build_set(files, contents, now=None, alpn=alpn)
        return cls(listener, files, served, stats, clock=clock, alpn=alpn, metrics=metrics)

    @property
    def served(self) -> ServedSet:
        """The set new connections are made from."""
        return self._served

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N803
        return self._served.tls.serverConnectionForTLS(tlsProtocol)

    def poll(self) -> ReloadResult | None:
        """Look at the files; load them once a change has stayed put for one poll, and
        say how that went (None: nothing to load yet)."""
        stats = tuple(_stat(path) for _, path in _paths(self.files))
        if stats != self._seen:
            self._seen = stats  # still being written, perhaps: look again next time
            return None
        if stats == self._tried:
            return None
        self._tried = stats
        return self.reload()

    def reload(self) -> ReloadResult:
        """Read the files now and serve them if they changed and make a whole set; else
        keep serving the set served so far. Says how it went."""
        self._tried = tuple(_stat(path) for _, path in _paths(self.files))
        now = datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.timezone.utc)
        try:
            contents = read_files(self.files)
            if _digest(contents) == self._served.digest:
                return ReloadResult(True, f"listener {self.listener}: TLS files unchanged")
            served = build_set(self.files, contents, now=now, alpn=self._alpn)
        except TLSFilesError as e:
            return self._failed(str(e))
        previous, self._served = self._served, served
        if self._metrics is not None:
            self._metrics.reloads.labels(self.listener).inc()
            self._metrics.expiry.labels(self.listener).set(served.not_after.timestamp())
        self.log.info(
            "listener {listener}: TLS files reloaded; serving certificate {sha256} "
            "(was {previous}), valid until {not_after}",
            listener=self.listener,
            sha256=served.certificate_sha256,
            previous=previous.certificate_sha256,
            not_after=served.not_after.isoformat(),
        )
        return ReloadResult(
            True,
            f"listener {self.listener}: serving certificate {served.certificate_sha256}",
            changed=True,
        )

    def _failed(self, why: str) -> ReloadResult:
        if self._metrics is not None:
            self._metrics.reload_failures.labels(self.listener).inc()
        self.log.error(
            "listener {listener}: TLS files not reloaded, still serving certificate "
            "{sha256}: {why}",
            listener=self.listener,
            sha256=self._served.certificate_sha256,
            why=why,
        )
        return ReloadResult(False, f"listener {self.listener}: {why}")


class CertificateWatch(Service):
    """Polls every TLS listener's files while the gateway runs (see the module's doc)."""

    log = Logger()

    def __init__(
        self,
        servers: Sequence[ReloadingServerTLS],
        clock: IReactorTime,
        interval: float = POLL_INTERVAL,
        *,
        on_reload: Callable[[ReloadResult], None] | None = None,
    ) -> None:
        self.servers = tuple(servers)
        self.interval = interval
        #: Told of every set the watch loaded, or could not load (for the audit log).
        self.on_reload = on_reload
        self._loop = LoopingCall(self.poll)
        self._loop.clock = clock

    def poll(self) -> None:
        for server in self.servers:
            try:
                result = server.poll()
                if result is not None and (result.changed or not result.ok) and self.on_reload:
                    self.on_reload(result)
            except Exception:
                # One listener's trouble must not stop the others' watch.
                self.log.failure(
                    "while checking listener {listener}'s TLS files", listener=server.listener
                )

    def reload(self) -> list[ReloadResult]:
        """Reload every listener's files now (a configuration reload does this)."""
        return [server.reload() for server in self.servers]

    def watch(self, servers: Sequence[ReloadingServerTLS]) -> None:
        """Watch ``servers`` from now on (after a configuration reload)."""
        self.servers = tuple(servers)
        if self.running and self.servers and not self._loop.running:
            self._loop.start(self.interval, now=False)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.servers:
            self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        if self._loop.running:
            self._loop.stop()
        super().stopService()  # type: ignore[no-untyped-call]
