"""A real redis-server on a free loopback port, for the tests that share state through it.

Optionally with a password (``requirepass``) and TLS only (certificates from a trustme CA;
the plain port is closed), and stoppable by SIGKILL to model a crash."""

from __future__ import annotations

import shutil
import signal
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import redis
import trustme

from tests.rig import free_port, wait_for


class RedisServer:
    def __init__(self, directory: Path, *, password: str | None = None, tls: bool = False) -> None:
        self.port, self.dir = free_port(), directory
        self.password, self.tls = password, tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "redis.log"
        self.ca_pem = directory / "redis-ca.pem"
        if tls:
            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1", "localhost")
            ca.cert_pem.write_to_path(str(self.ca_pem))
            cert.private_key_pem.write_to_path(str(directory / "redis-key.pem"))
            cert.cert_chain_pems[0].write_to_path(str(directory / "redis-cert.pem"))

    @property
    def url(self) -> str:
        """What a replica and the CLI are given: the password and the CA in the URL."""
        auth = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        if not self.tls:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        query = urllib.parse.urlencode({"ssl_ca_certs": self.ca_pem, "ssl_cert_reqs": "required"})
        return f"rediss://{auth}127.0.0.1:{self.port}/0?{query}"

    def client(self, **kwargs: object) -> redis.Redis:
        """A direct client (for the test's own reads), with the password and TLS if any."""
        extra: dict[str, object] = {"password": self.password}
        if self.tls:
            extra.update(ssl=True, ssl_ca_certs=str(self.ca_pem), ssl_cert_reqs="required")
        return redis.Redis(host="127.0.0.1", port=self.port, **extra, **kwargs)  # type: ignore[arg-type]

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server (>= 7) is not installed: run scripts/test (it installs it)")
        args = [exe, "--bind", "127.0.0.1", "--save", ""]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", str(self.dir / "redis-cert.pem")]
            args += ["--tls-key-file", str(self.dir / "redis-key.pem")]
            args += ["--tls-ca-cert-file", str(self.ca_pem), "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        args += ["--appendonly", "no", "--dir", str(self.dir)]
        self.log = self.dir / f"redis-{self.port}.log"
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)
        client, proc = self.client(socket_timeout=0.5), self.proc

        def up() -> bool:
            return proc.poll() is not None or _pings(client)  # exited: stop waiting, say why

        wait_for(up, 10, "redis-server")
        if proc.poll() is not None:  # it refused to start (e.g. a build without TLS)
            self.proc = None
            raise RedisStartError(self.log.read_text(errors="replace"))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def crash(self) -> None:
        """SIGKILL: no shutdown, no goodbye to clients, nothing saved (as an OOM kill)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None


class RedisStartError(Exception):
    """redis-server exited at start-up; the message is its log."""


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
