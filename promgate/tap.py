"""``twistd promgate``: command-line options and service assembly, nothing more."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn, cast

from twisted.application.service import IService
from twisted.python import usage

from promgate import __version__
from promgate.config.errors import ConfigError
from promgate.config.loader import load_config


class Options(usage.Options):
    """Options for ``twistd promgate``."""

    synopsis = "--config FILE [--ready-file FILE]"
    optParameters = [
        ["config", "c", None, "The promgate configuration file (YAML)."],
        ["ready-file", None, None, "Write listener addresses as JSON here once listening."],
    ]

    def opt_version(self) -> NoReturn:
        """Display promgate's and Twisted's versions and exit."""
        from twisted import copyright

        print(f"promgate {__version__}")
        print("Twisted version:", copyright.version)
        sys.exit(0)

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config is required")
        try:
            self["loaded"] = load_config(Path(self["config"]))
        except ConfigError as e:
            raise usage.UsageError("invalid configuration:\n" + str(e)) from None


def makeService(options: Options) -> IService:
    """Build the gateway service; the only place that touches the global reactor (and
    the process's excepthook: a start-up failure ends twistd with one line)."""
    from twisted.internet import reactor

    from promgate.errors import one_line_startup_errors
    from promgate.reactors import IGatewayReactor
    from promgate.service import GatewayService

    sys.excepthook = one_line_startup_errors(sys.excepthook)

    ready = Path(options["ready-file"]) if options["ready-file"] else None
    # Twisted types its global reactor with a few common interfaces only; the reactors
    # twistd installs on POSIX provide every one the gateway needs.
    gateway_reactor = cast(IGatewayReactor, reactor)
    return GatewayService(options["loaded"], gateway_reactor, ready_file=ready)
