"""A throwaway PKI for tests: a CA, gateway and client certificates, an audit key."""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from promgate.pki import CertificateAuthority, IssuedCert

__all__ = ["TestPKI"]


class TestPKI:
    """A throw-away CA with a gateway certificate and client certificates on disk.

    Client ``NAME`` gets CN=NAME and the URI SAN ``spiffe://promgate.local/NAME``.
    """

    __test__ = False  # not a test case, despite the name

    def __init__(self, directory: Path, trust_domain: str = "promgate.local") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.trust_domain = trust_domain
        self.ca = CertificateAuthority.create("promgate test CA")
        self.ca.write(self.ca_cert, self.directory / "ca-key.pem")
        self.ca.issue_server(["localhost"], ["127.0.0.1", "::1"]).write(
            self.gate_cert, self.gate_key
        )
        (self.directory / "audit.key").write_text(os.urandom(32).hex() + "\n")
        os.chmod(self.directory / "audit.key", 0o600)

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def gate_cert(self) -> Path:
        return self.directory / "gate.pem"

    @property
    def gate_key(self) -> Path:
        return self.directory / "gate-key.pem"

    @property
    def audit_key(self) -> Path:
        return self.directory / "audit.key"

    def client(
        self,
        name: str,
        *,
        expired: bool = False,
        uris: Sequence[str] | None = None,
        ca: CertificateAuthority | None = None,
    ) -> tuple[Path, Path]:
        """Issue (once) a client certificate; returns (cert, key) paths."""
        suffix = "-expired" if expired else ""
        if ca is not None and ca is not self.ca:
            suffix += "-foreign"
        cert_path = self.directory / f"client-{name}{suffix}.pem"
        key_path = self.directory / f"client-{name}{suffix}-key.pem"
        if not cert_path.exists():
            now = datetime.now(timezone.utc)
            issued: IssuedCert = (ca or self.ca).issue_client(
                name,
                uris=list(uris) if uris is not None else [f"spiffe://{self.trust_domain}/{name}"],
                not_before=now - timedelta(days=30) if expired else None,
                not_after=now - timedelta(days=1) if expired else None,
            )
            issued.write(cert_path, key_path)
        return cert_path, key_path

    def crl(
        self,
        revoked: Sequence[Path] = (),
        *,
        path: Path | None = None,
        next_update: datetime | None = None,
        ca: CertificateAuthority | None = None,
    ) -> Path:
        """Write a PEM certificate revocation list of the test CA (or ``ca``) that revokes
        the certificates in the files ``revoked``; returns its path (``crl.pem`` unless
        ``path`` is given). It is current for a day unless ``next_update`` says otherwise."""
        issuer = ca or self.ca
        ca_cert = x509.load_pem_x509_certificate(issuer.cert_pem)
        ca_key = serialization.load_pem_private_key(issuer.key_pem, password=None)
        now = datetime.now(timezone.utc)
        update = next_update if next_update is not None else now + timedelta(days=1)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(min(now - timedelta(minutes=5), update - timedelta(minutes=5)))
            .next_update(update)
        )
        for cert_path in revoked:
            serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - timedelta(minutes=1))
                .build()
            )
        crl = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        target = path if path is not None else self.directory / "crl.pem"
        target.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return target

    def foreign_client(self, name: str) -> tuple[Path, Path]:
        """A client certificate from a CA the gateway does not trust."""
        return self.client(name, ca=CertificateAuthority.create("some other CA"))

    def server_context(
        self, *, cert: tuple[Path, Path] | None = None, require_client_cert: bool = False
    ) -> ssl.SSLContext:
        """A TLS server context with the gate certificate (localhost, 127.0.0.1, ::1), for
        an ``https`` fake exporter: ``FakeExporter(..., tls=pki.server_context())``.

        ``cert`` serves another (certificate, key) pair instead, such as one from
        ``upstream``. ``require_client_cert`` makes the exporter demand a client
        certificate issued by this CA, as an exporter behind mutual TLS does.
        """
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert_path, key_path = cert if cert is not None else (self.gate_cert, self.gate_key)
        ctx.load_cert_chain(str(cert_path), str(key_path))
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=str(self.ca_cert))
        return ctx

    def upstream(
        self,
        name: str,
        *,
        uris: Sequence[str] = (),
        hostnames: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1", "::1"),
    ) -> tuple[Path, Path]:
        """Issue (once) a server certificate for an upstream exporter; returns (cert, key).

        ``uris`` are URI SANs (a SPIFFE ID, say) for routes that expect ``identity: {uri}``.
        """
        cert_path = self.directory / f"upstream-{name}.pem"
        key_path = self.directory / f"upstream-{name}-key.pem"
        if not cert_path.exists():
            self.ca.issue_server(list(hostnames), list(ips), uris=list(uris)).write(
                cert_path, key_path
            )
        return cert_path, key_path

    def client_context(self, name: str | None, **kwargs: Any) -> ssl.SSLContext:
        """A verifying client TLS context presenting ``name``'s certificate (or none)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        if name is not None:
            cert, key = self.client(name, **kwargs)
            ctx.load_cert_chain(str(cert), str(key))
        return ctx
