"""Registers ``twistd promgate``; everything else lives in promgate.tap."""

from twisted.application.service import ServiceMaker

promgate = ServiceMaker(
    "promgate",
    "promgate.tap",
    "Mutual-TLS gateway between Prometheus and the endpoints it scrapes",
    "promgate",
)
