"""Developer sessions for triopool.

``nox`` runs the default sessions (tests, lint, typecheck); ``nox -s docs``, ``nox -s bench``
and ``nox -s soak`` run the others. Arguments after ``--`` go to the underlying tool, e.g.
``nox -s tests -- -x -k pool`` or ``nox -s bench -- --dsn postgresql://...``.

Environments are reused between runs, and a session skips its install step when neither
``pyproject.toml`` nor its requirement list changed since the last install in that
environment, so a second ``nox -s tests`` goes straight to pytest. ``nox --reuse-venv=no``
(or deleting ``.nox/``) starts from scratch.

Sessions use the interpreter nox runs under; a fresh machine needs only Python >= 3.11.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import nox

nox.needs_version = ">=2024.10.9"
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_venv = "yes"
# uv makes environment creation and installs several times faster when it is installed;
# plain virtualenv (a dependency of nox itself) works everywhere else.
nox.options.default_venv_backend = "uv|virtualenv"

ROOT = Path(__file__).parent
PYPROJECT = ROOT / "pyproject.toml"
# Every psycopg minor allowed by the `psycopg` dependency range in pyproject.toml: the
# Connection touches psycopg internals, so each one must pass the whole suite.
PSYCOPG_MINORS = ["3.2", "3.3"]
LINT_PATHS = ["triopool", "tests", "benchmarks"]
STAMP_NAME = ".triopool-install-stamp"


def _install(session: nox.Session, *requirements: str) -> bool:
    """Install ``requirements`` unless this environment already has exactly them.

    The stamp records a digest of the requirement list, the interpreter version and, when the
    project is among the requirements, ``pyproject.toml``. The project is installed in
    editable mode, so source edits need no reinstall; a change to its metadata
    (dependencies, extras, entry points) does.

    Returns:
        True if an install ran, False if the environment was already up to date.
    """
    digest = hashlib.sha256()
    digest.update(sys.version.encode())
    digest.update("\0".join(requirements).encode())
    if any(req.startswith(".") for req in requirements):  # the project itself
        digest.update(PYPROJECT.read_bytes())
    stamp = session.env_dir / STAMP_NAME
    wanted = digest.hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == wanted:
        session.log("requirements unchanged since the last install: skipping it")
        return False
    stamp.unlink(missing_ok=True)
    session.install(*requirements)
    stamp.write_text(wanted + "\n")
    return True


@nox.session
@nox.parametrize("psycopg", PSYCOPG_MINORS)
def tests(session: nox.Session, psycopg: str) -> None:
    """Run the test suite against one psycopg minor version.

    ``TRIOPOOL_TEST_DSN`` (an existing server) and ``TRIOPOOL_PG_BINDIR`` (server binaries)
    are passed through from the calling environment.
    """
    # One resolver pass installs the project and pins psycopg (and its matching
    # psycopg-binary) to the requested minor, instead of installing the newest and
    # downgrading it afterwards. The `aio` extra brings trio-asyncio for the bridge's tests.
    if _install(session, "-e", ".[test,aio]", f"psycopg[binary]=={psycopg}.*"):
        session.run(
            "python",
            "-c",
            "import sys, psycopg; v = psycopg.__version__; print('psycopg', v);"
            f" sys.exit(not v.startswith('{psycopg}.'))",
        )
    # On every core (a server per worker); the pure policy's tests once, in the newest
    # minor's session: no psycopg version changes what they test.
    once = () if psycopg == PSYCOPG_MINORS[-1] else ("-m", "not psycopg_independent")
    session.run("pytest", "--numprocesses=auto", "--maxprocesses=4", *once, *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff (lint and format) plus the flake8-async checks ruff does not implement."""
    _install(session, "ruff>=0.17,<0.18", "flake8-async>=26.8")
    session.run("ruff", "check", *session.posargs)
    session.run("ruff", "format", "--check")
    # ruff lacks ASYNC102/103/910/913; a prefix such as ASYNC9 does not enable 910, so the
    # 9xx codes are listed one by one. Run standalone, flake8-async takes files only (it
    # does not walk directories), hence the expansion. `run` (ConnectionPool.run,
    # TcpProxy.run) is a `task_status` function: declaring it lets ASYNC113 catch it being
    # start_soon'ed from inside an async context manager (and silences ASYNC114).
    files = sorted(str(f.relative_to(ROOT)) for d in LINT_PATHS for f in (ROOT / d).rglob("*.py"))
    session.run(
        "flake8-async",
        "--enable=ASYNC1,ASYNC2,ASYNC910,ASYNC911,ASYNC912,ASYNC913",
        "--startable-in-context-manager=run",
        *files,
    )


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, tests, benchmarks and this file (see pyproject)."""
    _install(session, "-e", ".[test,bench,aio]", "mypy>=1.13", "nox")
    session.run("mypy", "--strict", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the HTML docs; any warning fails the build.

    Set ``TRIOPOOL_DOCS_OFFLINE=1`` to skip the intersphinx inventories (see docs/conf.py).
    """
    _install(session, "-e", ".[docs]")
    session.run(
        "sphinx-build",
        "-W",
        "--keep-going",
        "-n",
        "-b",
        "html",
        *session.posargs,
        "docs",
        "docs/_build/html",
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Run the scripts in benchmarks/ one after the other.

    ``nox -s bench`` runs all of them (``_*.py`` are helpers, not scripts);
    ``nox -s bench -- single_connection pool_throughput`` runs the named ones. Other
    arguments after ``--`` go to every script run; they all accept ``--dsn`` (without it,
    each script starts a throwaway PostgreSQL server of its own).
    """
    _install(session, "-e", ".[bench]")
    scripts = {
        path.stem: path
        for path in sorted((ROOT / "benchmarks").glob("*.py"))
        if not path.name.startswith("_")
    }
    wanted = [
        arg.removesuffix(".py") for arg in session.posargs if arg.removesuffix(".py") in scripts
    ]
    script_args = [arg for arg in session.posargs if arg.removesuffix(".py") not in scripts]
    if not scripts:
        session.error("no benchmark scripts in benchmarks/")
    for name in wanted or list(scripts):
        session.log(f"benchmark: {name}")
        session.run("python", str(scripts[name].relative_to(ROOT)), *script_args)


@nox.session
def soak(session: nox.Session) -> None:
    """The soak tests at full length (``TRIOPOOL_SOAK=long``); CI runs a short version."""
    _install(session, "-e", ".[test,aio]")
    session.run(
        "pytest",
        "-k",
        "soak",
        "--timeout=0",
        "-o",
        "faulthandler_timeout=0",
        *session.posargs,
        env={"TRIOPOOL_SOAK": "long"},
    )
