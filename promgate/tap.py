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
from promgate.config.model import worker_count
from promgate.logs import LEVELS, LogChoice


class Options(usage.Options):
    """Options for ``twistd promgate``."""

    synopsis = "--config FILE [--ready-file FILE] [--log-format text|json] [--log-level LEVEL]"
    optParameters = [
        ["config", "c", None, "The promgate configuration file (YAML)."],
        ["ready-file", None, None, "Write listener addresses as JSON here once listening."],
        ["log-format", None, "text", "text (twistd's format) or json (one object per line)."],
        ["log-level", None, "info", "The least severe events logged: " + ", ".join(LEVELS) + "."],
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
        self["logging"] = self._log_choice()
        try:
            self["loaded"] = load_config(Path(self["config"]))
        except ConfigError as e:
            raise usage.UsageError("invalid configuration:\n" + str(e)) from None

    def _log_choice(self) -> LogChoice | None:
        """What to log and where, or None to leave twistd's own logging as it is (the
        defaults: text at info)."""
        log_format, level = self["log-format"], self["log-level"]
        if log_format not in ("text", "json"):
            raise usage.UsageError(f"--log-format must be text or json, not {log_format!r}")
        if level not in LEVELS:
            raise usage.UsageError(f"--log-level must be one of {', '.join(LEVELS)}")
        if (log_format, level) == ("text", "info"):
            return None
        twistd = self.parent if self.parent is not None else {}
        if twistd.get("syslog"):
            raise usage.UsageError("--log-format and --log-level do not apply with --syslog")
        return LogChoice(
            log_format,
            LEVELS[level],
            logfile=twistd.get("logfile"),
            nodaemon=bool(twistd.get("nodaemon")),
        )


def makeService(options: Options) -> IService:
    """Build the gateway service; the only place that touches the global reactor (and
    the process's excepthook: a start-up failure ends twistd with one line)."""
    from twisted.internet import reactor

    from promgate.errors import one_line_startup_errors
    from promgate.logs import LoggingService, observer_for
    from promgate.reactors import IGatewayReactor
    from promgate.service import GatewayService
    from promgate.workers.reactors import ISupervisorReactor
    from promgate.workers.supervisor import Supervisor

    sys.excepthook = one_line_startup_errors(sys.excepthook)

    ready = Path(options["ready-file"]) if options["ready-file"] else None
    # Twisted types its global reactor with a few common interfaces only; the reactors
    # twistd installs on POSIX provide every one the gateway needs.
    gateway_reactor = cast(IGatewayReactor, reactor)
    choice: LogChoice | None = options["logging"]
    top = LoggingService(observer_for(choice) if choice is not None else None)
    config = options["loaded"]
    count = worker_count(config.workers)
    gateway: IService
    if count > 1:
        # One process binds and supervises; ``count`` worker processes serve.
        gateway = Supervisor(
            config,
            cast(ISupervisorReactor, reactor),
            count,
            ready_file=ready,
            log_level=options["log-level"],
        )
    else:
        gateway = GatewayService(config, gateway_reactor, ready_file=ready)
    gateway.setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
