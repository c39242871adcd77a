"""``triopool bench``, the main job, run as users run it: ``python -m triopool bench ...``.

Each test runs the command in a subprocess against a real server: the suite's
(``--dsn``) or the throwaway server the command starts for itself.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from _pool_checks import Server, dead, eventually

from triopool.testing._server import DIR_PREFIX, OWNER_FILE

COMMAND = [sys.executable, "-m", "triopool", "bench"]
#: Generous: the command starts a Python process, maybe a server, and runs a pool.
RUN_TIMEOUT = 60


def bench(*args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def bench_json(*args: str) -> dict[str, Any]:
    done = bench(*args, "--json")
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def folders_of(pid: int) -> list[Path]:
    """The throwaway-server folders that process `pid` made."""
    found = []
    for folder in Path("/tmp").glob(DIR_PREFIX + "*"):
        try:
            if int((folder / OWNER_FILE).read_text()) == pid:
                found.append(folder)
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.parametrize("workload", ["select1", "txn", "mixed", "fetchval"])
def test_json_run_against_a_given_server(postgres_server: Server, workload: str) -> None:
    """With ``--dsn``: exactly the requested number of requests, no error, the pool's
    stats, and no trace left in the database (``txn`` uses a temporary table).
    ``fetchval`` runs the one-shot call: no acquire wait of its own."""
    data = bench_json(
        "--dsn",
        postgres_server.dsn,
        "--workload",
        workload,
        "--queries",
        "300",
        "--clients",
        "20",
        "--pool-min",
        "2",
        "--pool-max",
        "4",
    )
    result = data["result"]
    assert (result["queries"], result["errors"]) == (300, 0)
    assert result["qps"] > 0
    assert set(result["latency_ms"]) == set(result["acquire_ms"]) == {"p50", "p90", "p99", "max"}
    stats = result["pool_stats"]
    assert (stats["pool_min"], stats["pool_max"]) == (2, 4)
    assert stats["requests_num"] >= 300
    assert data["settings"]["workload"] == workload
    if workload == "fetchval":
        assert result["acquire_ms"]["max"] == 0.0
    assert "dsn" not in data["settings"]  # may hold a password
    rows = postgres_server.execute(
        "SELECT count(*) FROM pg_class WHERE relname = 'triopool_bench' AND relpersistence <> 't'"
    )
    assert rows == [(0,)]


def test_without_dsn_runs_its_own_server_and_removes_it() -> None:
    """The README's main job: no set-up, a results table, nothing left behind."""
    process = subprocess.Popen(
        [*COMMAND, "--queries", "200", "--clients", "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = process.communicate(timeout=RUN_TIMEOUT)
    assert process.returncode == 0, err
    assert "starting a throwaway PostgreSQL server" in err
    for heading in ("requests/s", "acquire wait", "query latency", "p99", "pool stats"):
        assert heading in out, out
    assert folders_of(process.pid) == []


def test_ctrl_c_stops_the_run_and_removes_its_server() -> None:
    """Ctrl-C (SIGINT) while the pool is busy: exit status 130, server gone."""
    process = subprocess.Popen(
        [*COMMAND, "--duration", "60", "--clients", "10"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert eventually(lambda: pool_running(process.pid), RUN_TIMEOUT), "never got busy"
        postmaster = postmaster_of(process.pid)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130, err
    assert "interrupted" in err
    assert folders_of(process.pid) == []
    assert eventually(lambda: dead(postmaster))


def postmaster_of(pid: int) -> int:
    (folder,) = folders_of(pid)
    return int((folder / "data" / "postmaster.pid").read_text().split()[0])


def pool_running(pid: int) -> bool:
    """Whether the bench run by `pid` runs requests on its own server (past the pool's
    start: requests begin once ``min_size`` connections are open)."""
    folders = folders_of(pid)
    if not folders:
        return False
    try:
        lines = (folders[0] / "data" / "postmaster.pid").read_text().splitlines()
        if len(lines) < 8 or lines[7].strip() != "ready":
            return False
        conninfo = f"host=127.0.0.1 port={lines[3]} user=postgres dbname=postgres"
        with psycopg.connect(conninfo, connect_timeout=2) as admin:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = 'triopool-bench' AND query = 'SELECT 1'"
            ).fetchone()
    except (OSError, psycopg.Error):
        return False
    return row is not None and row[0] > 0


@pytest.mark.parametrize("form", ["url", "key=value"])
def test_compare_runs_every_stack_and_gives_ratios(
    postgres_server: Server, form: str, tmp_path: Path
) -> None:
    """``--compare``: each stack in its own process, medians and ratios to triopool, with
    either form of ``--dsn`` psycopg accepts (asyncpg gets it converted); asyncpg twice,
    with its default reset and with a no-op one; ``--plot`` writes a PNG.  (With the
    key=value form, the one-shot workload: ``pool.fetchval`` on triopool and asyncpg.)"""
    dsn = postgres_server.dsn if form == "url" else postgres_server.conninfo()
    workload = "select1" if form == "url" else "fetchval"
    plot = tmp_path / "compare.png"
    done = bench(
        *("--dsn", dsn, "--compare", "--rounds", "1", "--duration", "0.3"),
        *("--workload", workload, "--json", "--plot", str(plot)),
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    medians = data["median_qps"]
    assert {"triopool", "psycopg_pool"} <= set(medians)
    if importlib.util.find_spec("asyncpg") is not None:
        asyncpg = sorted(stack for stack in medians if stack.startswith("asyncpg"))
        assert [stack.partition(", ")[2] for stack in asyncpg] == ["default reset", "no-op reset"]
    assert all(qps > 0 for qps in medians.values()), medians
    assert data["triopool_ratio"]["triopool"] == 1.0
    for stack, runs in data["runs"].items():
        assert len(runs) == 1 and runs[0]["errors"] == 0, (stack, runs)
    assert plot.read_bytes().startswith(b"\x89PNG\r\n")
    assert done.stderr.strip().splitlines()[-1] == f"plot written to {plot}"


def one_line_error(done: subprocess.CompletedProcess[str], status: int) -> str:
    """The one line a failed run wrote to stderr (checked: its exit status, no traceback)."""
    assert done.returncode == status, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(("triopool bench: ", "triopool: ")), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--pool-min", "5", "--pool-max", "2"], "--pool-min <= --pool-max"),
        (["--pool-min", "-1"], "--pool-min"),
        (["--pool-max", "0"], "--pool-max >= 1"),
        (["--clients", "0"], "--clients: must be >= 1"),
        (["--duration", "-1"], "--duration: must be > 0"),
        (["--plot", "out.png"], "--plot needs --compare"),
        (["--workload", "nope"], "invalid choice: 'nope'"),
        (["--dsn", "nonsense"], 'no connection string (missing "=" after "nonsense"'),
        (["--compare", "--dsn", "host=127.0.0.1 keepalives=1"], "libpq's keepalives"),
        (["--compare", "--plot", "/no/such/folder/out.png"], "no folder /no/such/folder"),
        (["--compare", "--plot", "out.txt"], "cannot write .txt files"),
    ],
)
def test_bad_options_fail_at_once(args: list[str], says: str) -> None:
    """Bad input: exit status 2 and one line naming the problem, before anything runs."""
    line = one_line_error(bench(*args, timeout=30), 2)
    assert says in line
    assert line.endswith("(see 'triopool bench --help')")


def test_unreachable_server_fails_in_seconds(postgres_server: Server) -> None:
    """``--dsn`` at a closed port: exit status 1 within seconds, with libpq's reason."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = closed.getsockname()[1]
        started = time.monotonic()
        done = bench("--dsn", f"postgresql://postgres@127.0.0.1:{port}/postgres", timeout=30)
    assert time.monotonic() - started < 10
    line = one_line_error(done, 1)
    assert "cannot connect to --dsn" in line and "Connection refused" in line
