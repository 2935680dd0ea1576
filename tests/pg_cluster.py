"""A throwaway PostgreSQL cluster on 127.0.0.1, for the tests, CI and the benchmarks.

One implementation, three users: ``.ci/run`` starts a cluster for the whole run with::

    eval "$(python tests/pg_cluster.py start /tmp/some-dir)"   # exports KIMI_BUDGET_TEST_POSTGRES
    python tests/pg_cluster.py stop /tmp/some-dir

the tests' session fixture (``tests/conftest.py``) uses that server when the variable is set
and otherwise starts its own cluster with :class:`Cluster` (or skips, saying how to get one),
and the stress harness and the benchmarks start private clusters they may restart.

The cluster is made with Debian's server binaries (``initdb``, ``pg_ctl`` from the
``postgresql`` package, in ``/usr/lib/postgresql/<version>/bin``), in a temporary folder, on a
free port, listening on 127.0.0.1 only (no Unix socket), with ``trust`` authentication for
the loopback. ``initdb`` refuses to run as root, so as root the server runs as the
``postgres`` user when it exists, else as ``nobody``; the folder is handed to that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = [
    "ENV_URL",
    "Bouncer",
    "Cluster",
    "PostgresUnavailable",
    "Server",
    "find_bindir",
    "install_hint",
]

# The URL of a server the tests may create and drop databases on (a superuser's).
ENV_URL = "KIMI_BUDGET_TEST_POSTGRES"
# Its data folder, when the server was started by this script: lets tests restart it.
ENV_DATA = "KIMI_BUDGET_TEST_PGDATA"
SUPERUSER = "kb"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries (or no user to run them as) on this machine."""


def install_hint() -> str:
    return (
        f"set {ENV_URL}=postgresql://USER@HOST:PORT/postgres (a superuser on a throwaway "
        f"server), or install PostgreSQL's server binaries (Debian: apt-get install "
        f"postgresql) so that the tests start their own cluster; .ci/run does both"
    )


def find_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` (or ``$KIMI_BUDGET_PG_BINDIR``)."""
    configured = os.environ.get("KIMI_BUDGET_PG_BINDIR")
    candidates = [Path(configured)] if configured else []
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates += [Path(p) for p in reversed(versions)]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    raise PostgresUnavailable("no PostgreSQL server binaries (initdb, pg_ctl) found")


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user to run the server as when we are root (``None``: ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresUnavailable("running as root and there is no 'postgres' or 'nobody' user")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A PostgreSQL cluster in ``base`` (``base/data``, its log in ``base/server.log``)."""

    def __init__(self, base: str | os.PathLike[str], port: int | None = None) -> None:
        self.base = Path(base)
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port_file = self.base / "port"
        if port is None and self.port_file.exists():
            port = int(self.port_file.read_text().strip())
        self.port = port or 0
        self.bindir = find_bindir()
        self.user = _run_as()

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            check=check,
            cwd="/",
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
            **kwargs,
        )

    def init(self, *, durable: bool = False) -> None:
        """``initdb`` the folder. ``durable=False`` turns off fsync: fine for a throwaway."""
        self.base.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            os.chown(self.base, self.user.pw_uid, self.user.pw_gid)
            os.chmod(self.base, 0o700)
        try:
            self._cmd(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            )
        except subprocess.CalledProcessError as exc:
            raise PostgresUnavailable(f"initdb failed: {exc.stderr.strip()}") from None
        settings = [
            "listen_addresses = '127.0.0.1'",
            "unix_socket_directories = ''",
            "max_connections = 200",
            "shared_buffers = 128MB",
            "log_min_messages = warning",
        ]
        if not durable:
            settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# kimi-budget test cluster\n" + "\n".join(settings) + "\n")

    def start(self, *, attempts: int = 5) -> None:
        """Start the server (on a free port the first time, then always the same one)."""
        for _ in range(attempts):
            port = self.port or _free_port()
            # A log outside the data folder the server user can write: create it as ours.
            self.log.touch()
            if self.user is not None:
                os.chown(self.log, self.user.pw_uid, self.user.pw_gid)
            proc = self._cmd(
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                f"-p {port}",
                "-w",
                "-t",
                "60",
                "start",
                check=False,
            )
            if proc.returncode == 0:
                self.port = port
                self.port_file.write_text(f"{port}\n")
                return
            if self.port:
                break  # a fixed port (a restart): do not wander off to another one
        tail = self.log.read_text("utf-8", "replace")[-2000:] if self.log.exists() else ""
        raise PostgresUnavailable(f"pg_ctl start failed: {proc.stderr.strip()}\n{tail}")

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._cmd("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        """Stop (``fast`` closes every connection, ``immediate`` is a crash) and start again."""
        self.stop(mode)
        self.start()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self._cmd(
                "pg_isready", "-h", "127.0.0.1", "-p", str(self.port), "-q", check=False
            )
            if proc.returncode == 0:
                return
            time.sleep(0.1)
        raise PostgresUnavailable(f"the server on port {self.port} did not become ready")

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    @classmethod
    def temporary(cls, *, durable: bool = False, prefix: str = "kb-pg-") -> Cluster:
        """A new cluster in a new temporary folder, started. ``destroy()`` removes it."""
        cluster = cls(tempfile.mkdtemp(prefix=prefix))
        try:
            cluster.init(durable=durable)
            cluster.start()
        except BaseException:
            shutil.rmtree(cluster.base, ignore_errors=True)
            raise
        return cluster


class Bouncer:
    """PgBouncer in transaction pooling mode in front of ``url``'s server, on a free port.

    Debian's ``pgbouncer`` package; a small pool (2 server connections) so that consecutive
    transactions of one client land on different server sessions, as in production.
    """

    def __init__(self, url: str, pool_size: int = 2) -> None:
        from urllib.parse import urlsplit

        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(binary).exists():
            raise PostgresUnavailable("no pgbouncer binary (Debian: apt-get install pgbouncer)")
        self.binary = binary
        parts = urlsplit(url)
        self.target_host = parts.hostname or "127.0.0.1"
        self.target_port = parts.port or 5432
        self.user = parts.username or SUPERUSER
        self.pool_size = pool_size
        self.base = Path(tempfile.mkdtemp(prefix="kb-pgbouncer-"))
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.run_as = _run_as()

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        self.port = _free_port()
        users = self.base / "users.txt"
        users.write_text(f'"{self.user}" ""\n')
        config = self.base / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = host={self.target_host} port={self.target_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {users}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 200\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"logfile = {self.base / 'pgbouncer.log'}\n"
        )
        kwargs: dict[str, Any] = {}
        if self.run_as is not None:
            for path in (self.base, users, config):
                os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)
            kwargs.update(user=self.run_as.pw_uid, group=self.run_as.pw_gid, extra_groups=[])
        self.proc = subprocess.Popen(
            [self.binary, str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
            **kwargs,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise PostgresUnavailable(f"pgbouncer exited: {err[-1000:]}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            time.sleep(0.05)
        raise PostgresUnavailable("pgbouncer did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self.base, ignore_errors=True)


class Server:
    """A server the tests may create databases on: ``KIMI_BUDGET_TEST_POSTGRES``'s, or a
    cluster of our own. ``cluster`` is set when we know its folder (and so can restart it)."""

    def __init__(self, url: str, cluster: Cluster | None, owned: bool) -> None:
        self.url = url
        self.cluster = cluster
        self.owned = owned
        self._count = 0

    @classmethod
    def from_environment(cls, url: str | None, data: str | None) -> Server:
        """The configured server, else a new private cluster (``PostgresUnavailable``)."""
        if url:
            cluster = None
            if data and Path(data, "data", "postmaster.pid").exists():
                with contextlib.suppress(PostgresUnavailable):
                    cluster = Cluster(data)
            return cls(url, cluster, owned=False)
        cluster = Cluster.temporary()
        return cls(cluster.url, cluster, owned=True)

    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(self.url, autocommit=True, connect_timeout=10)

    def create_database(self) -> str:
        """A new empty database; returns its URL (the server's URL with its name)."""
        self._count += 1
        name = f"kb_test_{os.getpid()}_{self._count}"
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return _with_dbname(self.url, name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1].split("?", 1)[0]
        with contextlib.suppress(Exception), self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        if self.owned and self.cluster is not None:
            self.cluster.destroy()


def _with_dbname(url: str, name: str) -> str:
    head, _, tail = url.rpartition("/")
    query = tail.partition("?")[2]
    return f"{head}/{name}" + (f"?{query}" if query else "")


def _main(argv: list[str]) -> int:
    usage = "usage: pg_cluster.py start|stop|restart DIR"
    if len(argv) != 2 or argv[0] not in ("start", "stop", "restart"):
        print(usage, file=sys.stderr)
        return 2
    command, base = argv
    if command == "start":
        cluster = Cluster(base)
        cluster.init()
        cluster.start()
        # For eval in a shell: the tests find the server (and its folder, to restart it).
        print(f"export {ENV_URL}={cluster.url}")
        print(f"export {ENV_DATA}={cluster.base}")
        return 0
    cluster = Cluster(base)
    if command == "restart":
        cluster.restart()
        return 0
    cluster.stop()
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
