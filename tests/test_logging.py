"""``twistd promgate --log-format json|text --log-level LEVEL``: one JSON object per line
with the event's named fields, or twistd's text, without the events below the level."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.logger import Logger, LogLevel, eventAsJSON
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import promgate
from promgate.logs import LogChoice, json_line, observer_for
from promgate.tap import Options
from promgate.testing import TestPKI, https_get
from promgate.testing.integration import q, tls_section


def _env() -> dict[str, str]:
    """The child imports the same promgate as this test."""
    root = str(Path(promgate.__file__).resolve().parent.parent)
    return dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )


def _event(**fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "log_time": 1_700_000_000.25,
        "log_level": LogLevel.warn,
        "log_namespace": "promgate.test",
        "log_format": "route {route} throttled {identity}",
    }
    event.update(fields)
    return event


class JSONLineTests(SynchronousTestCase):
    """One event, one line of JSON."""

    def test_fields(self) -> None:
        """time (RFC 3339, UTC), level, namespace, message, then the named fields."""
        line = json_line(_event(route="node", identity="prometheus", count=3))
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(
            json.loads(line),
            {
                "time": "2023-11-14T22:13:20.250Z",
                "level": "warn",
                "namespace": "promgate.test",
                "message": "route node throttled prometheus",
                "route": "node",
                "identity": "prometheus",
                "count": 3,
            },
        )

    def test_json_safe(self) -> None:
        """Values JSON cannot carry are written as text; newlines stay escaped."""
        record = json.loads(
            json_line(
                _event(
                    route=b"n\xffode",
                    identity=float("nan"),
                    other=object(),
                    nested={"a": (1, 2.5, "x\ny")},
                )
            )
        )
        self.assertEqual(record["route"], "n\\xffode")
        self.assertEqual(record["identity"], "nan")
        self.assertTrue(record["other"].startswith("<object object"))
        self.assertEqual(record["nested"], {"a": [1, 2.5, "x\ny"]})

    def test_failure(self) -> None:
        """A logged failure's traceback is kept."""
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            failure = Failure()
        record = json.loads(json_line(_event(log_failure=failure, route="r", identity="i")))
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_level_filter(self) -> None:
        """Events below the chosen level are dropped."""
        path = Path(self.mktemp())
        observer = observer_for(LogChoice("json", LogLevel.warn, logfile=str(path), nodaemon=False))
        log = Logger(namespace="promgate.test", observer=observer)
        log.info("hidden {x}", x=1)
        log.error("shown {x}", x=2)
        lines = path.read_text().splitlines()
        self.assertEqual([json.loads(line)["message"] for line in lines], ["shown 2"])

    def test_twisted_serialisation_unchanged(self) -> None:
        """The events themselves are untouched (Twisted's own JSON of them still works)."""
        event = _event(route="node", identity="x")
        json_line(event)
        self.assertIn("route", json.loads(eventAsJSON(event)))


class OptionTests(SynchronousTestCase):
    """The options are checked before anything starts."""

    def parse(self, *args: str) -> Options:
        options = Options()
        options["config"] = "unused"
        options.postOptions = lambda: setattr(options, "checked", options._log_choice())  # type: ignore[method-assign]
        options.parseOptions(list(args))
        return options

    def test_defaults_leave_twistd_alone(self) -> None:
        """Text at info is twistd's own logging, untouched."""
        self.assertIsNone(self.parse().checked)  # type: ignore[attr-defined]

    def test_choices(self) -> None:
        choice = self.parse("--log-format", "json", "--log-level", "error").checked  # type: ignore[attr-defined]
        self.assertEqual((choice.log_format, choice.level), ("json", LogLevel.error))

    def test_bad_values(self) -> None:
        self.assertRaises(usage.UsageError, self.parse, "--log-format", "xml")
        self.assertRaises(usage.UsageError, self.parse, "--log-level", "verbose")


class TwistdTests(SynchronousTestCase):
    """The real ``twistd promgate`` logs as asked."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        pki = TestPKI(self.dir / "pki")
        self.config = self.dir / "promgate.yaml"
        self.config.write_text(
            tls_section(pki)
            + 'admin: {endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + "listeners:\n"
            + '  - {name: scrape, protocol: http, endpoint: "tcp:0:interface=127.0.0.1"}\n'
            + 'routes:\n  node: {allow: [], targets: {static: ["127.0.0.1:1"]}}\n'
            + f"audit: {{path: audit.jsonl, key_file: {q(pki.audit_key)}}}\n"
        )

    def run_gateway(self, *args: str, twistd_args: tuple[str, ...] = ()) -> str:
        """Start ``twistd -n promgate`` with ``args``, wait until it listens, stop it;
        its standard output."""
        ready = self.dir / "ready.json"
        ready.unlink(missing_ok=True)
        out = self.dir / "stdout"
        with out.open("wb") as stdout:
            process = subprocess.Popen(
                [
                    *(sys.executable, "-c", "from twisted.scripts.twistd import run; run()"),
                    *("-n", "--pidfile=", *twistd_args, "promgate"),
                    *("--config", str(self.config), "--ready-file", str(ready), *args),
                ],
                cwd=self.dir,
                env=_env(),
                stdout=stdout,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.addCleanup(process.kill)
        deadline = time.monotonic() + 30
        while not ready.exists():
            self.assertIsNone(process.poll(), out.read_text())
            self.assertLess(time.monotonic(), deadline, "not ready in 30s")
            time.sleep(0.02)
        # Stop it once its reactor runs (and handles SIGTERM): the admin listener answers.
        admin = json.loads(ready.read_text())["listeners"]["admin"]
        while https_get(admin, "/-/healthy", None).status != 200:
            self.assertLess(time.monotonic(), deadline, "admin listener silent in 30s")
            time.sleep(0.02)
        process.terminate()
        # twistd ends with the signal that stopped it, once it has shut down cleanly.
        self.assertIn(process.wait(30), (0, -signal.SIGTERM), out.read_text())
        return out.read_text()

    def test_json(self) -> None:
        """Every line is one JSON object; promgate's own events carry their fields."""
        records = [
            json.loads(line) for line in self.run_gateway("--log-format", "json").splitlines()
        ]
        for record in records:
            self.assertLessEqual({"time", "level", "namespace", "message"}, set(record))
        (listening,) = [
            r
            for r in records
            if r["namespace"] == "promgate.service.GatewayService" and r.get("name") == "scrape"
        ]
        self.assertEqual(listening["level"], "info")
        self.assertTrue(listening["address"].startswith("127.0.0.1:"))

    def test_json_to_logfile(self) -> None:
        """With ``--logfile``, the JSON lines go to that file."""
        logfile = self.dir / "promgate.log"
        self.run_gateway("--log-format", "json", twistd_args=("--logfile", str(logfile)))
        lines = logfile.read_text().splitlines()
        self.assertTrue(lines)
        for line in lines:
            json.loads(line)

    def test_level(self) -> None:
        """``--log-level warn`` drops the info lines; the default text keeps them."""
        self.assertNotIn("listener scrape on", self.run_gateway("--log-level", "warn"))
        self.assertIn("listener scrape on", self.run_gateway())
