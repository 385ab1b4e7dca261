"""Start real PostgreSQL and Redis servers on 127.0.0.1 for the test session.

PostgreSQL refuses to run as root, so when the suite runs as root the server's
commands run as the ``postgres`` user (``runuser``), in a data directory under a
temporary folder that the postgres user owns. Each server listens on a free port.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis


class ServerError(RuntimeError):
    """A test server could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _postgres_bin_dir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not candidates:
        raise ServerError("PostgreSQL is not installed (no pg_ctl): run `make deps` or apt-get")
    return Path(candidates[-1]).parent


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass
class PostgresServer:
    """A PostgreSQL cluster started for the tests; ``stop()`` removes it."""

    port: int
    root: Path
    bin_dir: Path
    user: str = "postgres"
    options: str = ""

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL (psycopg 3) for ``database`` on this server."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def restart(self) -> None:
        """Stop the server (dropping every connection) and start it again on its port."""
        _run(
            _as_postgres(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "-D",
                    str(self.root / "data"),
                    "-m",
                    "fast",
                    # A log file, or the new server inherits (and holds open) our pipes.
                    "-l",
                    str(self.root / "postgres.log"),
                    "-w",
                    "-t",
                    "60",
                    "restart",
                ]
            ),
            "pg_ctl restart",
        )

    def halt(self) -> None:
        """Stop the server (fast: every connection dropped), keeping its data for start()."""
        _run(
            _as_postgres(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "-D",
                    str(self.root / "data"),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "60",
                    "stop",
                ]
            ),
            "pg_ctl stop",
        )

    def start(self) -> None:
        """Start a halted server again on its port, with the options it first ran with."""
        _pg_ctl_start(self.bin_dir, self.root, self.options)

    def stop(self) -> None:
        """Stop the server at once and remove its files."""
        subprocess.run(
            _as_postgres(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "-D",
                    str(self.root / "data"),
                    "-m",
                    "immediate",
                    "stop",
                ]
            ),
            capture_output=True,
            check=False,
        )
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """initdb and start a throwaway cluster tuned for tests (no fsync), on a free port."""
    bin_dir = _postgres_bin_dir()
    root = Path(tempfile.mkdtemp(prefix="conveyor-pg-"))
    os.chmod(root, 0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    port = free_port()
    _run(
        _as_postgres(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ]
        ),
        "initdb",
    )
    options = " ".join(
        [
            "-c listen_addresses=127.0.0.1",
            f"-p {port}",
            f"-k {root}",
            "-c fsync=off",
            "-c synchronous_commit=off",
            "-c full_page_writes=off",
            "-c max_connections=300",
        ]
    )
    _pg_ctl_start(bin_dir, root, options)
    return PostgresServer(port=port, root=root, bin_dir=bin_dir, options=options)


def _pg_ctl_start(bin_dir: Path, root: Path, options: str) -> None:
    _run(
        _as_postgres(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(root / "data"),
                "-o",
                options,
                "-l",
                str(root / "postgres.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        ),
        "pg_ctl start",
    )


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ServerError(f"{what} failed ({result.returncode}): {result.stderr or result.stdout}")


@dataclass
class RedisServer:
    """A redis-server process started for the tests, with persistence off."""

    port: int
    process: subprocess.Popen[bytes]
    root: Path

    @property
    def url(self) -> str:
        """The server's redis:// URL (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server (it keeps nothing: persistence is off); start_again() revives it."""
        self.process.kill()
        self.process.wait()

    def start_again(self) -> None:
        """Start an empty server on the same port after kill(), and wait until it answers."""
        self.process = _spawn_redis(self.port, self.root)
        _wait_for_redis(self)


def start_redis() -> RedisServer:
    """Start redis-server on a free port of 127.0.0.1 and wait until it answers PING."""
    root = Path(tempfile.mkdtemp(prefix="conveyor-redis-"))
    port = free_port()
    server = RedisServer(port=port, process=_spawn_redis(port, root), root=root)
    _wait_for_redis(server)
    return server


def _spawn_redis(port: int, root: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerError("redis-server is not installed: run `make deps` or apt-get")
    return subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(root),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for_redis(server: RedisServer) -> None:
    client = redis.Redis(host="127.0.0.1", port=server.port)
    deadline = time.monotonic() + 20
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if server.process.poll() is not None or time.monotonic() > deadline:
                    server.stop()
                    raise ServerError("redis-server did not start") from None
                time.sleep(0.05)
    finally:
        client.close()
