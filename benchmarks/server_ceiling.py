"""What the server can do: pgbench ``SELECT 1`` with the benchmark's client count.

    python benchmarks/server_ceiling.py [--dsn DSN] [--clients 10] [--duration 5]

Runs ``pgbench -n -S``-style with a custom ``SELECT 1`` script (prepared
protocol, ``--jobs 2``) so pool results can be read as a fraction of the
server's ceiling on this machine.  pgbench is found next to the server
binaries (``triopool.testing.find_server_binaries``) or on PATH.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from _server import add_dsn_argument, server_dsn


def pgbench_path() -> str:
    try:
        from triopool.testing import find_server_binaries

        candidate = find_server_binaries() / "pgbench"
        if candidate.exists():
            return str(candidate)
    except Exception:
        pass
    found = shutil.which("pgbench")
    if not found:
        raise SystemExit("pgbench not found: install PostgreSQL's client tools")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dsn_argument(parser)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--duration", type=int, default=5)
    args = parser.parse_args()
    with server_dsn(args.dsn) as dsn, tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "select1.sql"
        script.write_text("SELECT 1;\n")
        out = subprocess.run(
            [
                pgbench_path(),
                "-n",
                "-M",
                "prepared",
                "-f",
                str(script),
                "-c",
                str(args.clients),
                "-j",
                "2",
                "-T",
                str(args.duration),
                dsn,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        match = re.search(r"tps = ([\d.]+)", out)
        print(
            f"server ceiling: {float(match.group(1)) if match else 0:.0f} SELECT 1/s "
            f"with {args.clients} clients (pgbench, prepared, 2 threads)"
        )


if __name__ == "__main__":
    main()
