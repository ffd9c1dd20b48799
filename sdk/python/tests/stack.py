"""What the tests run against: a throwaway PostgreSQL (one per session, a database per test),
a throwaway redis-server per test, and replicas of the real binary (``ge-orchestrator run``),
each on free ports, as the project's own tests start them (tests/it/harness.rs,
src/tools/localstack.rs).

The binary is ``GE_ORCHESTRATOR_BIN``, else ``$CARGO_TARGET_DIR/{release,debug}/ge-orchestrator``
(``target/`` of the repository when the variable is unset). Without a binary, or without
redis-server and the PostgreSQL server binaries, the tests that need them are skipped, unless
``GE_SDK_REQUIRE_STACK=1`` (set by scripts/test), which makes that a failure.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[3]

#: How long a test waits for something that takes well under a second when all is well: it
#: is generous because tests run beside others on few cores. Running out is a failure, never a
#: measurement.
T = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(what: str) -> None:
    if os.environ.get("GE_SDK_REQUIRE_STACK") == "1":
        pytest.fail(f"{what} (GE_SDK_REQUIRE_STACK=1)")
    pytest.skip(what)


def find_binary() -> Optional[Path]:
    explicit = os.environ.get("GE_ORCHESTRATOR_BIN")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    for profile in ("release", "debug"):
        p = target / profile / "ge-orchestrator"
        if p.is_file():
            return p
    return None


def find_redis_server() -> Optional[str]:
    return shutil.which("redis-server") or next((p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if os.path.isfile(p)), None)


def find_pg_bindir() -> Optional[Path]:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out and (Path(out) / "postgres").is_file() and (Path(out) / "initdb").is_file():
            return Path(out)
    except OSError:
        pass
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


def wait_until(check, what: str, timeout: float = T, every: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except Exception:  # noqa: BLE001 - not ready yet
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Postgres:
    """One server for the session; ``create_database`` gives each test its own database."""

    def __init__(self) -> None:
        bindir = find_pg_bindir()
        if bindir is None:
            need("the PostgreSQL server binaries (postgres, initdb) are not installed; run scripts/setup.sh")
        self.bindir = bindir
        # Not under pytest's temporary directory, which the postgres user may not enter.
        self.dir = Path(tempfile.mkdtemp(prefix="ge-sdk-pg-"))
        os.chmod(self.dir, 0o755)
        self.user: Optional[pwd.struct_passwd] = None
        if os.geteuid() == 0:
            # postgres refuses to run as root; then it runs as the postgres system user.
            self.user = pwd.getpwnam("postgres")
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        data = self.dir / "data"
        self._as_user([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"], check=True)
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        settings = ["fsync=off", "synchronous_commit=on", "full_page_writes=off", "max_connections=200", "listen_addresses=127.0.0.1"]
        args = [str(bindir / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.dir)]
        for s in settings:
            args += ["-c", s]
        logf = open(self.log, "wb")
        self.proc = subprocess.Popen(
            args, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, preexec_fn=self._demote(), start_new_session=True
        )
        wait_until(lambda: self.psql("SELECT 1", check=False).returncode == 0, "postgres to start")

    def _demote(self):  # type: ignore[no-untyped-def]
        user = self.user
        if user is None:
            return None

        def f() -> None:
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

        return f

    def _as_user(self, args: List[str], check: bool = False) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
        return subprocess.run(args, capture_output=True, text=True, check=check, preexec_fn=self._demote(), cwd=self.dir)

    def psql(self, sql: str, db: str = "postgres", check: bool = True) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
        return subprocess.run(
            [str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", db, "-Atqc", sql],
            capture_output=True,
            text=True,
            check=check,
        )

    def create_database(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{name}"')
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    """redis-server on a free port; ``replica_of`` a master's port makes it a replica,
    ``sentinel_of`` a master's port makes it a Sentinel (``redis-server --sentinel``, what
    Debian's redis-sentinel is) watching that master as ``mymaster``."""

    def __init__(self, base: Path, replica_of: Optional[int] = None, sentinel_of: Optional[int] = None) -> None:
        bin_ = find_redis_server()
        if bin_ is None:
            need("redis-server is not installed; run scripts/setup.sh")
        self.dir = Path(tempfile.mkdtemp(dir=base, prefix="redis-"))
        self.log = self.dir / "redis.log"
        for _ in range(5):
            # A free port may be taken before the server binds it: then another one.
            self.port = free_port()
            conf = self.dir / "redis.conf"
            lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}", f"logfile {self.log}"]
            if sentinel_of is None:
                # repl-diskless-sync-delay: a replica's full sync starts at once, not after 5 s.
                lines += ['save ""', "appendonly no", "repl-diskless-sync-delay 0"]
            if replica_of is not None:
                lines.append(f"replicaof 127.0.0.1 {replica_of}")
            if sentinel_of is not None:
                lines += [
                    f"sentinel monitor mymaster 127.0.0.1 {sentinel_of} 1",
                    "sentinel down-after-milliseconds mymaster 2000",
                    "sentinel failover-timeout mymaster 10000",
                ]
            conf.write_text("\n".join(lines) + "\n")
            args = [bin_, str(conf)] + (["--sentinel"] if sentinel_of is not None else [])
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            if wait_until(lambda: self.proc.poll() is not None or self._pong(), "redis-server to start") and self.proc.poll() is None:
                return
        raise AssertionError(f"redis-server did not start:\n{log_tail(self.log)}")

    def _pong(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


ROUTING = """version: 1
agents:
  writer:   { roles: [writing] }
  reviewer: { roles: [reviewing] }
  worker:   { roles: [work] }
work_types:
  draft: writing
  review: reviewing
default_agent: worker
retry: { max_attempts: 3, backoff: { initial: 1s, factor: 1, max: 1s } }
"""


class Replica:
    """``ge-orchestrator run`` as a process, serving HTTP on a free port, once ready."""

    def __init__(self, stack: "Stack", consumer: str) -> None:
        self.consumer = consumer
        self.log = stack.dir / f"replica-{consumer}.log"
        env = dict(os.environ)
        env.update(
            REDIS_URL=stack.redis_url,
            DATABASE_URL=stack.database_url,
            GE_ROUTING_CONFIG=str(stack.routing),
            GE_SCHEDULER_INTERVAL="100ms",
            GE_HEALTH_INTERVAL="1s",
            GE_DB_POOL="4",
            GE_DB_OPS_POOL="2",
            RUST_LOG=os.environ.get("RUST_LOG", "info"),
        )
        for k in ("GE_ADMIN_READ_TOKEN", "GE_ADMIN_TOKEN"):
            env.pop(k, None)
        for _ in range(3):
            # A free port may be taken before the replica binds it: then another one.
            self.http_port = free_port()
            args = [str(stack.binary), "run", "--consumer", consumer, "--block", "200ms", "--http-addr", f"127.0.0.1:{self.http_port}"]
            logf = open(self.log, "wb")
            self.proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
            wait_until(lambda: self.proc.poll() is not None or self._ready(), f"replica {consumer} to be ready (log: {self.log})")
            if self.proc.poll() is None:
                return
        raise AssertionError(f"replica {consumer} exited with {self.proc.returncode}:\n{log_tail(self.log)}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _ready(self) -> bool:
        with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
            return r.status == 200

    def kill(self) -> None:
        """kill -9."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Stack:
    """One test's Redis, database, routing file and replicas."""

    def __init__(self, base: Path, postgres: Postgres, binary: Path, name: str) -> None:
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(dir=base, prefix=f"{name[:40]}-"))
        self.redis = Redis(self.dir)
        self.extra_redis: List[Redis] = []
        self.redis_url = self.redis.url
        self.database_url = postgres.create_database("t_" + os.urandom(8).hex())
        self.routing = self.dir / "routing.yaml"
        self.routing.write_text(ROUTING)
        self.replicas: List[Replica] = []
        self.children: List[subprocess.Popen] = []  # type: ignore[type-arg]

    def with_sentinel(self) -> str:
        """Makes this stack's Redis the master of a replica watched by a Sentinel; returns the
        Sentinel URL (``redis+sentinel://127.0.0.1:PORT/mymaster``), which the replicas
        started afterwards are given."""
        replica = Redis(self.dir, replica_of=self.redis.port)
        sentinel = Redis(self.dir, sentinel_of=self.redis.port)
        self.extra_redis += [replica, sentinel]
        self.redis_url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster"
        return self.redis_url

    def replica(self, consumer: str) -> Replica:
        r = Replica(self, consumer)
        self.replicas.append(r)
        return r

    def python(self, script: str, env: Optional[Dict[str, str]] = None, log_name: str = "child") -> subprocess.Popen:  # type: ignore[type-arg]
        """This Python running ``script`` (a file's path) with REDIS_URL set, its output in
        the test's directory."""
        e = dict(os.environ)
        e.update(REDIS_URL=self.redis.url, PYTHONUNBUFFERED="1")
        e.update(env or {})
        logf = open(self.dir / f"{log_name}.log", "wb")
        p = subprocess.Popen([sys.executable, script], env=e, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        self.children.append(p)
        return p

    def stop(self) -> None:
        for c in self.children:
            if c.poll() is None:
                c.kill()
                c.wait()
        for r in self.replicas:
            r.kill()
        for x in self.extra_redis:
            x.stop()
        self.redis.stop()
