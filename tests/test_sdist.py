"""The source distribution: it carries the license, the operator's files (etc/), the
documentation and the test suite, and a quick part of that suite passes when run from the
unpacked archive (against the promgate inside it, not this checkout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300.0
#: Test modules run from the unpacked sdist: quick, and between them they read etc/,
#: docs/ and the package.
QUICK_TESTS = ("tests.test_paths", "tests.test_monitoring_rules", "tests.test_config_schema")
_IGNORED = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".constraints-venv",
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


class Sdist:
    """The sdist, built once from a copy of the tree, listed and unpacked."""

    def __init__(self) -> None:
        work = Path(tempfile.mkdtemp(prefix="sdist-", dir=os.getcwd()))
        source = work / "source"
        shutil.copytree(ROOT, source, ignore=_IGNORED)
        for local in ("etc/pki", "etc/audit.jsonl", "etc/audit.key"):  # a local `make pki`
            path = source / local
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        (source / "etc" / "pki").mkdir()
        (source / "etc" / "pki" / "ca-key.pem").write_text("never shipped\n")
        out = work / "dist"
        result = subprocess.run(
            [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out)],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        archives = sorted(out.glob("promgate-*.tar.gz")) if out.is_dir() else []
        if result.returncode != 0 or len(archives) != 1:
            raise RuntimeError(f"building the sdist failed:\n{result.stdout}\n{result.stderr}")
        with tarfile.open(archives[0]) as archive:
            members = archive.getnames()
            archive.extractall(work / "unpacked", filter="data")
        top = members[0].split("/")[0]
        self.names = {name.partition("/")[2] for name in members}
        self.unpacked = work / "unpacked" / top


_built: Sdist | None = None
_error: str | None = None


def built_sdist() -> Sdist:
    """The sdist, built on first use and shared by the tests here (a failure too)."""
    global _built, _error
    if _error is not None:
        raise RuntimeError(_error)
    if _built is None:
        try:
            _built = Sdist()
        except Exception as e:
            _error = f"{type(e).__name__}: {e}"
            raise
    return _built


class SdistTests(SynchronousTestCase):
    """What the sdist holds, and a quick part of the suite run from it."""

    def setUp(self) -> None:
        try:
            import build  # noqa: F401
        except ImportError:
            raise SkipTest("the 'build' package (test extra) is not installed") from None
        sdist = built_sdist()
        self.names = sdist.names
        self.unpacked = sdist.unpacked

    def test_contents(self) -> None:
        """License, changelog, build files, etc/ (with the monitoring mixin), docs/ and
        tests/ are in; a local PKI and caches are not."""
        for name in (
            "LICENSE",
            "NEWS.rst",
            "SECURITY.md",
            "pyproject.toml",
            "setup.cfg",
            "constraints.txt",
            "Makefile",
            "etc/promgate.yaml",
            "etc/monitoring/promgate-alerts.yaml",
            "etc/monitoring/promgate-dashboard.json",
            "docs/metrics.md",
            "docs/promgate.schema.json",
            "tests/__init__.py",
            "tests/test_sdist.py",
            "promgate/__init__.py",
            "twisted/plugins/promgate_plugin.py",
        ):
            self.assertIn(name, self.names)
        self.assertFalse([n for n in self.names if n.startswith("etc/pki")])
        self.assertFalse([n for n in self.names if "__pycache__" in n])

    def test_quick_tests_from_sdist(self) -> None:
        """A quick part of the suite passes from the unpacked sdist."""
        env = dict(os.environ, PYTHONPATH=str(self.unpacked))
        env.pop("PYTHONSTARTUP", None)
        result = subprocess.run(
            [sys.executable, "-m", "twisted.trial", *QUICK_TESTS],
            cwd=self.unpacked,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        self.assertEqual(result.returncode, 0, result.stdout[-6000:] + result.stderr[-2000:])
        where = subprocess.run(
            [sys.executable, "-c", "import promgate; print(promgate.__file__)"],
            cwd=self.unpacked,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        self.assertTrue(where.startswith(str(self.unpacked)), where)
