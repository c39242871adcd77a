"""Every code example in the docs runs against the throwaway server and prints what the docs say.

The examples live in ``docs/examples/`` and the pages show them with ``literalinclude``:

* ``docs/examples/*.py`` are programs, run as ``python example.py DSN``: each must print
  exactly its ``.out`` file (which the pages show as the output), and leave no pool open and
  no backend behind;
* ``docs/examples/<project>/`` (with a ``conftest.py``) is a pytest project, run by pytest
  against the same server (``TRIOPOOL_TEST_DSN``): all its tests must pass;
* ``docs/examples/asgi/*.py`` are web apps, served by hypercorn and driven over HTTP by
  ``tests/test_asgi.py``.

`test_pages_show_only_tested_examples` keeps it that way: no ``.rst`` page may show Python
code any other way.  Blocks excluded from running: shell commands (``code-block:: console``)
and configuration files (``code-block:: ini``, ``literalinclude`` of a ``.ini`` or ``.out``
with a non-Python ``:language:``); they are not Python.
"""

from __future__ import annotations

import ast
import re
import runpy
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from _pool_checks import Server, app_name, assert_settled, settled_backends

from triopool import ConnectionPool
from triopool.testing import PgBouncer, PostgresServer, StandbyServer, multi_host_conninfo

pytest_plugins = ["pytester"]

DOCS = Path(__file__).resolve().parent.parent / "docs"
EXAMPLES = DOCS / "examples"
PROGRAMS = sorted(EXAMPLES.glob("*.py"))
PROJECTS = sorted(conftest.parent for conftest in EXAMPLES.glob("*/conftest.py"))
ASGI_APPS = EXAMPLES / "asgi"  # tests/test_asgi.py serves every app in it
PAGES = sorted(page for page in DOCS.rglob("*.rst") if "_build" not in page.parts)

# Languages of blocks that are not Python and are not run: shell sessions, config files and
# program output.
NON_PYTHON = {"console", "shell", "sh", "bash", "ini", "toml", "text", "none"}
# Directives that show no code of their own (their body, if any, is scanned as rst).
PLAIN_DIRECTIVES = {
    "toctree", "module", "currentmodule", "autoclass", "autofunction", "autoexception",
    "automodule", "automethod", "autoattribute", "autodata", "note", "warning", "tip",
    "important", "seealso", "versionadded", "versionchanged", "deprecated", "contents",
    "rubric", "image", "figure", "list-table", "csv-table", "table", "glossary", "index",
}  # fmt: skip
CODE_DIRECTIVES = {"code-block", "code", "sourcecode"}
# Parts of a Python example are chosen by name or marker, never by (fragile) line numbers.
PYTHON_INCLUDE_OPTIONS = {"pyobject", "start-at", "start-after", "end-at", "end-before"}
OTHER_INCLUDE_OPTIONS = {"language", "lines"}

DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\.\s+(?P<name>[\w-]+)::(?:\s+(?P<arg>.*?))?\s*$")
OPTION = re.compile(r"^\s+:(?P<name>[\w-]+):(?:\s+(?P<value>.*?))?\s*$")
EXPLICIT_MARKUP = re.compile(r"^(?P<indent>\s*)\.\.(?:\s|$)")


def test_every_program_has_its_output() -> None:
    """Each example program has a non-empty ``.out`` (what it must print), and nothing is stray."""
    assert PROGRAMS, f"no examples in {EXAMPLES}"
    for program in PROGRAMS:
        out = program.with_suffix(".out")
        assert out.is_file() and out.read_text().strip(), f"{out.name} missing or empty"
    known = {*PROGRAMS, *(p.with_suffix(".out") for p in PROGRAMS), *PROJECTS, ASGI_APPS}
    stray = [
        path for path in EXAMPLES.iterdir() if path not in known and path.name != "__pycache__"
    ]
    assert stray == [], "neither a program, its output, nor a pytest project"


# -- running the examples -------------------------------------------------------------------


def record_pools(monkeypatch: pytest.MonkeyPatch) -> list[ConnectionPool]:
    """Every pool (of any class) constructed from now on, for the leak check afterwards."""
    pools: list[ConnectionPool] = []
    original: Callable[..., None] = ConnectionPool.__init__

    def init(self: ConnectionPool, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        pools.append(self)

    monkeypatch.setattr(ConnectionPool, "__init__", init)
    return pools


async def check_settled(pools: list[ConnectionPool], server: Server, name: str) -> None:
    """Every pool closed and settled, and the server has no backend left for `name`."""
    for pool in pools:
        assert pool.closed, f"{pool!r} left open"
        await assert_settled(pool, server, name)
    assert await settled_backends(server, name, 0) == 0, "backends left behind"


@pytest.mark.parametrize("program", PROGRAMS, ids=[p.stem for p in PROGRAMS])
def test_example_program(
    program: Path,
    postgres_server: Server,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``python example.py DSN`` prints exactly the ``.out`` the docs show, and leaks nothing.

    Run in this process (``runpy``, as ``__main__``) so that the pools it creates can be
    checked; the DSN carries an ``application_name`` to count its backends.
    """
    name = app_name("docs")
    pools = record_pools(monkeypatch)
    dsn = postgres_server.conninfo(application_name=name)
    monkeypatch.setattr(sys, "argv", [str(program), dsn])
    runpy.run_path(str(program), run_name="__main__")
    assert capsys.readouterr().out == program.with_suffix(".out").read_text()
    trio.run(check_settled, pools, postgres_server, name)


def count_tests(project: Path) -> int:
    """The test functions defined in the project's ``test_*.py`` files."""
    return sum(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
        for module in project.glob("test_*.py")
        for node in ast.parse(module.read_text()).body
    )


@pytest.mark.parametrize("project", PROJECTS, ids=[p.name for p in PROJECTS])
def test_example_pytest_project(
    project: Path,
    postgres_server: Server,
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The docs' example test suite passes, run by pytest with the project's own config.

    In process, against this session's server through ``TRIOPOOL_TEST_DSN``; every test it
    defines must pass (none skipped), and it leaves no backend behind.
    """
    expected = count_tests(project)
    assert expected > 0
    for path in project.iterdir():
        if path.is_file():
            shutil.copy(path, pytester.path / path.name)
    name = app_name("docs")
    pools = record_pools(monkeypatch)
    monkeypatch.setenv("TRIOPOOL_TEST_DSN", postgres_server.conninfo(application_name=name))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--import-mode=importlib")
    result.assert_outcomes(passed=expected)
    trio.run(check_settled, pools, postgres_server, name)


# -- the pages show no other code ---------------------------------------------------------


@dataclass
class PageScan:
    """What `scan_page` found: Python files included, and problems (``file:line: why``)."""

    included: set[Path] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """The index of the first line after `start` that is not blank and not indented past
    `indent`: the end of a directive's, comment's or literal block's body."""
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    return end


def _defines(module: Path, dotted: str) -> bool:
    """Whether `module` defines `dotted` (``name`` or ``Class.name``) at its top level."""
    scope: list[ast.stmt] = ast.parse(module.read_text()).body
    for part in dotted.split("."):
        found = [
            node
            for node in scope
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and node.name == part
        ]
        if not found:
            return False
        scope = found[0].body
    return True


def _check_include(
    where: str, target: Path, options: dict[str, str], scan: PageScan, examples: Path
) -> None:
    if not target.is_relative_to(examples) or not target.is_file():
        scan.problems.append(f"{where}: literalinclude of {target}: not a file in {examples}")
        return
    if target.suffix != ".py":
        if options.get("language", "").lower() not in NON_PYTHON:
            scan.problems.append(f"{where}: {target.name} needs a non-Python :language:")
        if unknown := set(options) - OTHER_INCLUDE_OPTIONS:
            scan.problems.append(f"{where}: options {sorted(unknown)} not allowed here")
        return
    if unknown := set(options) - PYTHON_INCLUDE_OPTIONS:
        scan.problems.append(f"{where}: options {sorted(unknown)} not allowed for Python")
    scan.included.add(target)
    text = target.read_text()
    if "pyobject" in options and not _defines(target, options["pyobject"]):
        scan.problems.append(f"{where}: {target.name} defines no {options['pyobject']}")
    for marker in ("start-at", "start-after", "end-at", "end-before"):
        if marker in options and options[marker] not in text:
            scan.problems.append(f"{where}: {options[marker]!r} not in {target.name}")


def scan_page(page: Path, text: str, scan: PageScan, examples: Path = EXAMPLES) -> None:
    """Record into `scan` the examples `page` includes, and any other way it shows code.

    Code may only be shown by ``literalinclude`` of a file under `examples` (Python files
    there are run by this module), or, for what is not Python, by a ``code-block`` or
    ``literalinclude`` with a language from `NON_PYTHON`.  Literal blocks (``::``),
    doctest blocks (``>>>``), ``code-block`` without a non-Python language and unknown
    directives are problems.  Comments are skipped.
    """
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        where = f"{page.relative_to(examples.parent)}:{i + 1}"
        directive = DIRECTIVE.match(line)
        if directive:
            name, arg = directive["name"], (directive["arg"] or "").strip()
            indent = _indent(line)
            end = _block_end(lines, i, indent)
            if name in PLAIN_DIRECTIVES:
                i += 1  # the body is rst: scan it
                continue
            if name in CODE_DIRECTIVES:
                if arg.lower() not in NON_PYTHON:
                    scan.problems.append(f"{where}: {name} {arg!r}: use a tested literalinclude")
            elif name == "literalinclude":
                options: dict[str, str] = {}
                for option_line in lines[i + 1 : end]:
                    if option := OPTION.match(option_line):
                        options[option["name"]] = option["value"] or ""
                base = examples.parent if arg.startswith("/") else page.parent
                target = (base / arg.lstrip("/")).resolve()
                _check_include(where, target, options, scan, examples)
            else:
                scan.problems.append(f"{where}: directive {name!r} is not known to show no code")
            i = end
        elif markup := EXPLICIT_MARKUP.match(line):
            stripped = line.strip()
            if stripped.startswith((".. _", ".. [")):
                i += 1  # a link target or a footnote
            else:
                i = _block_end(lines, i, len(markup["indent"]))  # a comment
        elif line.rstrip().endswith("::"):
            scan.problems.append(f"{where}: literal block: use a tested literalinclude")
            i = _block_end(lines, i, _indent(line))
        elif line.lstrip().startswith(">>>"):
            scan.problems.append(f"{where}: doctest block: use a tested literalinclude")
            i += 1
        else:
            i += 1


def test_pages_show_only_tested_examples() -> None:
    """No page shows Python code that is not an example run here, and every example is shown."""
    assert PAGES, f"no pages in {DOCS}"
    scan = PageScan()
    for page in PAGES:
        scan_page(page, page.read_text(), scan, EXAMPLES)
    assert scan.problems == []
    tested = {
        *PROGRAMS,
        *(path for project in PROJECTS for path in project.glob("*.py")),
        *ASGI_APPS.glob("*.py"),
    }
    assert scan.included <= tested
    assert sorted(tested - scan.included) == [], "examples no page shows"


def _scan(text: str) -> PageScan:
    scan = PageScan()
    page = DOCS / "howto" / "page.rst"  # a page in a subfolder: includes are relative to it
    scan_page(page, text, scan, EXAMPLES)
    return scan


EXAMPLE = PROGRAMS[0].name if PROGRAMS else "missing.py"


@pytest.mark.parametrize(
    "text",
    [
        "Some code::\n\n    print(1)\n",
        "::\n\n    print(1)\n",
        ".. note::\n\n   Inside a note::\n\n      print(1)\n",
        ".. code-block:: python\n\n   print(1)\n",
        ".. code-block::\n\n   print(1)\n",
        ".. code:: py\n\n   print(1)\n",
        ".. highlight:: python\n",
        ".. doctest::\n\n   >>> print(1)\n",
        "Text.\n\n>>> print(1)\n1\n",
        ".. literalinclude:: ../../triopool/pool.py\n",
        f".. literalinclude:: ../examples/{EXAMPLE}\n   :lines: 1-3\n",
        f".. literalinclude:: ../examples/{EXAMPLE}\n   :pyobject: no_such_function\n",
        f".. literalinclude:: ../examples/{EXAMPLE}\n   :start-after: no such marker\n",
        f".. literalinclude:: ../examples/{EXAMPLE}\n   :language: text\n",
        f".. literalinclude:: ../examples/{EXAMPLE}\n   :language: python\n",
        ".. literalinclude:: ../examples/pytest_project/pytest.ini\n",
    ],
)
def test_scan_flags_untested_code(text: str) -> None:
    """The page check is not vacuous: each way of sneaking in code is flagged."""
    assert _scan(text).problems != []


def test_scan_accepts_examples_shell_and_comments() -> None:
    """Includes of examples, non-Python blocks, comments and targets pass."""
    text = (
        ".. _label:\n\n"
        ".. A comment with a literal marker::\n\n   print(1)\n\n"
        f".. literalinclude:: ../examples/{EXAMPLE}\n   :pyobject: main\n\n"
        f".. literalinclude:: /examples/{EXAMPLE}\n   :start-at: import\n\n"
        ".. literalinclude:: ../examples/pytest_project/pytest.ini\n   :language: ini\n\n"
        ".. code-block:: console\n\n   $ pip install triopool\n\n"
        ".. note::\n\n   Plain text, ``literal`` inline.\n"
    )
    scan = _scan(text)
    assert scan.problems == []
    assert scan.included == {EXAMPLES / EXAMPLE}


# -- examples against real PgBouncer and a real standby ---------------------------------------


def test_pgbouncer_example_through_pgbouncer(
    pgbouncer_factory: Callable[..., PgBouncer],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The PgBouncer how-to's program works through a real PgBouncer in transaction mode with
    a single server connection, where automatic prepared statements would collide."""
    bouncer = pgbouncer_factory(pool_mode="transaction", default_pool_size=1)
    program = EXAMPLES / "howto_pgbouncer.py"
    pools = record_pools(monkeypatch)
    monkeypatch.setattr(sys, "argv", [str(program), bouncer.conninfo()])
    runpy.run_path(str(program), run_name="__main__")
    assert capsys.readouterr().out == program.with_suffix(".out").read_text()
    # PgBouncer keeps its server connections: the leak check is the pool's books and
    # PgBouncer's own list of clients.
    for pool in pools:
        assert pool.closed
        trio.run(assert_settled, pool)
    clients = [row for row in bouncer.admin("SHOW CLIENTS") if row["database"] != "pgbouncer"]
    assert clients == []


async def test_read_write_split_with_a_real_standby(
    replica_pair: tuple[PostgresServer, StandbyServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """With a streaming standby among the hosts, the recipe's read pool lands on it."""
    primary, standby = replica_pair
    example = runpy.run_path(str(EXAMPLES / "howto_failover.py"))
    name = app_name("docs")
    await example["read_write_split"](multi_host_conninfo(standby, primary, application_name=name))
    assert capsys.readouterr().out == "writes go to the primary\nreads go to the standby\n"
    for server in (primary, standby):
        assert await settled_backends(server, name, 0) == 0
