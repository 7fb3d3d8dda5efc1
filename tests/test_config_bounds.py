"""Reading a configuration is bounded whatever the file says: size, alias expansion, files."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from promgate import cli
from promgate.config.loader import check_config
from promgate.config.yaml_source import MAX_FILE_SIZE, MAX_FILES, MAX_NODES
from promgate.discovery.file_sd import FileSDError, parse_file_sd

#: Nine levels of nine aliases each: 9**9 (387 million) values if expanded, from 1 KiB.
BILLION_LAUGHS = textwrap.dedent(
    """\
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    routes: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
    """
)


def messages(path: Path) -> list[str]:
    """The errors ``check-config`` reports for ``path``, as it prints them."""
    _, errors, _ = check_config(path)
    return [str(e) for e in errors]


class AliasExpansionTests(SynchronousTestCase):
    """Anchors and aliases cannot make loading grow without bound."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def test_billion_laughs_refused(self) -> None:
        """The classic document is refused with FILE:LINE and the limit."""
        path = self.dir / "bomb.yaml"
        path.write_text(BILLION_LAUGHS)
        found = messages(path)
        self.assertEqual(len(found), 1, found)
        self.assertRegex(found[0], rf"^{path}:\d+: .*more than {MAX_NODES} values")

    def test_bounded_in_a_child_process(self) -> None:
        """``promgate check-config`` on the document, in a process capped at 512 MiB of
        memory and 60 s of CPU: it answers (exit 1, one line) instead of growing until
        it dies."""
        path = self.dir / "bomb.yaml"
        path.write_text(BILLION_LAUGHS)
        code = (
            "import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))\n"
            "resource.setrlimit(resource.RLIMIT_CPU, (60, 60))\n"
            "from promgate.cli import main\n"
            "sys.exit(main(['check-config', sys.argv[1]]))\n"
        )
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=root)
        done = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn(f"more than {MAX_NODES} values", done.stdout + done.stderr)
        self.assertNotIn("MemoryError", done.stdout + done.stderr)

    def test_long_key_under_an_anchor(self) -> None:
        """A long explicit key under an anchor, aliased a few hundred times, would copy the
        key (and the key paths below it) per use: the characters count against a budget
        too, so this is refused though it produces few values."""
        path = self.dir / "long-key.yaml"
        key = "K" * 100_000
        path.write_text(f"a: &a\n  ? {key}\n  : 1\nb: [" + ",".join(["*a"] * 300) + "]\n")
        found = messages(path)
        self.assertEqual(len(found), 1, found)
        self.assertIn("characters (through anchors and aliases?); refused", found[0])

    def test_aliases_within_the_bound_still_work(self) -> None:
        """An alias used a few times is an ordinary YAML feature and stays allowed."""
        path = self.dir / "ok.yaml"
        path.write_text(
            "x-allow: &allow [ops]\nroutes:\n  a: {allow: *allow}\n  b: {allow: *allow}\n"
        )
        self.assertFalse(any("values" in m for m in messages(path)))


class FileBoundTests(SynchronousTestCase):
    """A file too large, or too many files, are refused with the limit."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def test_file_too_large(self) -> None:
        """A configuration file beyond MAX_FILE_SIZE is not parsed."""
        path = self.dir / "big.yaml"
        path.write_text("# " + "x" * MAX_FILE_SIZE + "\n")
        self.assertEqual(
            messages(path), [f"{path}: file is larger than the limit of {MAX_FILE_SIZE} bytes"]
        )

    def test_too_many_files(self) -> None:
        """Includes that name more than MAX_FILES files stop at the limit, saying so."""
        drop = self.dir / "d"
        drop.mkdir()
        for i in range(MAX_FILES + 5):
            (drop / f"{i:05}.yaml").write_text("{}\n")
        path = self.dir / "main.yaml"
        path.write_text("include: ['d/*.yaml']\n")
        found = [m for m in messages(path) if "files to read" in m]
        self.assertEqual(len(found), 1, found)
        self.assertIn(f"more than {MAX_FILES} files", found[0])


class UnreadableValueTests(SynchronousTestCase):
    """A scalar YAML cannot turn into a value is a problem at its line, not a traceback."""

    def test_bad_date_and_huge_integer(self) -> None:
        path = Path(self.mktemp())
        path.write_text("routes:\n  a:\n    x: 2001-02-30\n    y: " + "9" * 5000 + "\n")
        found = messages(path)
        self.assertIn(f"{path}:3: routes.a.x: value cannot be read: day is out of range", found[0])
        self.assertTrue(found[1].startswith(f"{path}:4: routes.a.y: value cannot be read"))


class OtherYAMLTests(SynchronousTestCase):
    """YAML the gateway reads at run time (file_sd) and policy test files are bounded too."""

    def test_file_sd_bomb(self) -> None:
        """A file_sd file of nested aliases is refused, not expanded: the running gateway
        keeps its last good targets (see docs/discovery.md)."""
        with self.assertRaises(FileSDError) as cm:
            parse_file_sd("bomb.yaml", BILLION_LAUGHS.encode())
        self.assertIn("expands to more than", str(cm.exception))

    def test_file_sd_still_reads_large_files(self) -> None:
        """The budget grows with the file: 20,000 targets without aliases read fine."""
        text = "- targets:\n" + "".join(
            f"  - 10.0.{i // 250}.{i % 250}:9100\n" for i in range(20000)
        )
        self.assertEqual(len(parse_file_sd("big.yaml", text.encode())), 20000)

    def test_policy_tests_bomb(self) -> None:
        """``promgate test-policy`` on a bomb answers with exit 2 and the reason."""
        path = Path(self.mktemp())
        path.write_text(BILLION_LAUGHS)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["test-policy", str(path)])
        self.assertEqual(code, 2)
        self.assertIn("expands to more than", err.getvalue() + out.getvalue())
