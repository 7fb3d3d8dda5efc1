"""promgate: the one door between Prometheus and the endpoints it scrapes."""

__version__ = "0.1.0"
