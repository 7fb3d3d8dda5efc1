#!/usr/bin/env python3
"""The floor for promgate's CPU per scrape: a bare Twisted TLS-terminating TCP relay.

It terminates mutual TLS as promgate does (the same certificate, key and CA, a client
certificate required, ALPN ``http/1.1``) and relays the bytes of each connection to one
backend over a new TCP connection, with flow control both ways. No HTTP, no policy, no audit:
what is left is Twisted's reactor and TLS. ``bench/scrape_bench.py`` runs it as the ``floor``
row; it is a measurement tool, not part of promgate::

    python bench/tls_floor.py --port P --cert gate.pem --key gate.key --ca ca.pem \\
        --backend-port B
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from twisted.internet import endpoints, reactor, ssl
from twisted.protocols.portforward import ProxyFactory


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--backend-port", type=int, required=True)
    args = ap.parse_args(argv)
    with open(args.cert, "rb") as c, open(args.key, "rb") as k, open(args.ca, "rb") as a:
        cert = ssl.PrivateCertificate.loadPEM(c.read() + k.read())
        ca = ssl.Certificate.loadPEM(a.read())
    options = ssl.CertificateOptions(
        privateKey=cert.privateKey.original,
        certificate=cert.original,
        verify=True,
        caCerts=[ca.original],
        requireCertificate=True,
        acceptableProtocols=[b"http/1.1"],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    endpoint = endpoints.SSL4ServerEndpoint(
        reactor, args.port, options, backlog=1024, interface="127.0.0.1"
    )
    endpoint.listen(ProxyFactory("127.0.0.1", args.backend_port))
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
