"""Packaging: the built wheel carries the twistd plugin, and the plugin stays cheap to import.

The wheel is built once (from a copy of the source tree, so the checkout gets no build/ or
egg-info litter) and unpacked; each check then runs in a fresh interpreter that sees only
the unpacked wheel, never this checkout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = "twisted/plugins/promgate_plugin.py"
BUILD_TIMEOUT = 300.0
RUN_TIMEOUT = 60.0


#: Build outputs, caches and local state that a fresh checkout would not have.
_IGNORED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "_trial_temp*",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "dropin.cache",
)


def _not_source(directory: str, names: list[str]) -> set[str]:
    ignored = set(_IGNORED(directory, names))
    if Path(directory) == ROOT / "etc":
        ignored.update({"pki", "audit.jsonl"} & set(names))  # a local `make pki`
    return ignored


class BuiltWheel:
    """The project's wheel, built and unpacked in a temporary directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wheel-", dir=os.getcwd()))
        source = self.dir / "source"
        shutil.copytree(ROOT, source, ignore=_not_source)
        out = self.dir / "dist"
        if importlib.util.find_spec("build") is not None:
            command = [sys.executable, "-m", "build", "--wheel", "--no-isolation"]
            command += ["--outdir", str(out), str(source)]
        else:
            command = [sys.executable, "-m", "pip", "wheel", "--no-deps"]
            command += ["--no-build-isolation", "--wheel-dir", str(out), str(source)]
        result = subprocess.run(
            command,
            cwd=source,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        wheels = sorted(out.glob("promgate-*.whl")) if out.is_dir() else []
        if result.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(
                f"building the wheel failed ({result.returncode}):\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        self.wheel = wheels[0]
        with zipfile.ZipFile(self.wheel) as archive:
            self.names = set(archive.namelist())
            self.site = self.dir / "site"
            archive.extractall(self.site)
        self.cwd = self.dir / "empty"
        self.cwd.mkdir()

    def python(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run this interpreter on ``args`` with only the unpacked wheel added to its path."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.site)
        env.pop("PYTHONSTARTUP", None)
        return subprocess.run(
            [sys.executable, *args],
            cwd=self.cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )


_wheel: BuiltWheel | None = None
_wheel_error: str | None = None


def built_wheel() -> BuiltWheel:
    """The wheel, built on first use and shared by every test here (a failure too)."""
    global _wheel, _wheel_error
    if _wheel is None:
        if _wheel_error is not None:
            raise RuntimeError(f"building the wheel failed earlier:\n{_wheel_error}")
        try:
            _wheel = BuiltWheel()
        except Exception as e:
            _wheel_error = f"{type(e).__name__}: {e}"
            raise
    return _wheel


class WheelContentsTests(SynchronousTestCase):
    """The wheel holds the plugin as a namespace-package file and nothing that shadows Twisted."""

    def setUp(self) -> None:
        self.wheel = built_wheel()

    def test_plugin_inside(self) -> None:
        """twisted/plugins/promgate_plugin.py is in the wheel."""
        self.assertIn(PLUGIN, self.wheel.names)

    def test_no_twisted_package_init(self) -> None:
        """Neither twisted/__init__.py nor twisted/plugins/__init__.py is in the wheel."""
        self.assertNotIn("twisted/__init__.py", self.wheel.names)
        self.assertNotIn("twisted/plugins/__init__.py", self.wheel.names)
        twisted_files = {n for n in self.wheel.names if n.startswith("twisted/")}
        self.assertEqual(twisted_files, {PLUGIN})

    def test_console_script(self) -> None:
        """The wheel declares the ``promgate`` command."""
        (entry_points,) = [n for n in self.wheel.names if n.endswith(".dist-info/entry_points.txt")]
        with zipfile.ZipFile(self.wheel.wheel) as archive:
            text = archive.read(entry_points).decode()
        self.assertIn("promgate = promgate.cli:main", text)


class InstalledPluginTests(SynchronousTestCase):
    """From the unpacked wheel, in a fresh interpreter, twistd finds a cheap plugin."""

    def setUp(self) -> None:
        self.wheel = built_wheel()

    def test_import_does_not_import_reactor(self) -> None:
        """Importing twisted.plugins.promgate_plugin does not install the reactor."""
        # Load the wheel's own copy by path: where promgate is also installed (as in CI's
        # virtualenv), twisted.plugins would otherwise find the installed copy first.
        result = self.wheel.python(
            "-c",
            "import importlib.util, json, os, sys\n"
            "import twisted.plugins\n"
            f"path = {str(self.wheel.site / PLUGIN)!r}\n"
            "spec = importlib.util.spec_from_file_location("
            "'twisted.plugins.promgate_plugin', path)\n"
            "plugin = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(plugin)\n"
            "print(json.dumps({'reactor': 'twisted.internet.reactor' in sys.modules,"
            " 'searched': os.path.dirname(path) in twisted.plugins.__path__,"
            " 'tapname': plugin.promgate.tapname}))",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        report = json.loads(result.stdout)
        self.assertFalse(report["reactor"], "importing the plugin imported the reactor")
        self.assertTrue(report["searched"], "twisted.plugins does not search the wheel")
        self.assertEqual(report["tapname"], "promgate")

    def test_twistd_help_lists_promgate(self) -> None:
        """``twistd --help`` lists the promgate subcommand."""
        result = self.wheel.python("-c", "from twisted.scripts.twistd import run; run()", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        commands = [line.split() for line in result.stdout.splitlines() if line.startswith("    ")]
        self.assertIn("promgate", [words[0] for words in commands if words], result.stdout)

    def test_service_maker_points_at_tap(self) -> None:
        """The plugin's ServiceMaker names promgate.tap, which has Options and makeService."""
        result = self.wheel.python(
            "-c",
            "import importlib, json\n"
            "from twisted.application.service import IServiceMaker\n"
            "from twisted.plugin import getPlugins\n"
            "from twisted import plugins\n"
            "(maker,) = [p for p in getPlugins(IServiceMaker, plugins)"
            " if p.tapname == 'promgate']\n"
            "tap = importlib.import_module(maker.module)\n"
            "print(json.dumps({'module': maker.module, 'file': tap.__file__,"
            " 'options': callable(getattr(tap, 'Options', None)),"
            " 'make': callable(getattr(tap, 'makeService', None))}))",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        report = json.loads(result.stdout)
        self.assertEqual(report["module"], "promgate.tap")
        self.assertEqual(Path(report["file"]), self.wheel.site / "promgate" / "tap.py")
        self.assertTrue(report["options"] and report["make"], report)
