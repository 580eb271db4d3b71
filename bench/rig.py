"""Shared rig: child processes, the upstream, the proxies under test, load runs and results.

Every section gets one ``Rig``: it starts bare mitmdump and axme-fw processes on
loopback, runs the same load generator against each, and collects result rows.
Every child is stopped on any exit (``Procs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import BIN, HOST, ROOT, Deadline, Sizes, _child_setup, wait_until
from .fixtures import Cred, write_rules
from .report import Row, fmt_row_values
from .wire import origin_get, proxied_get, read_response


class Procs:
    """Every child process, so that all of them are stopped on any exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.items: list[asyncio.subprocess.Process] = []

    async def start(
        self,
        args: Sequence[str | Path],
        *,
        log: Path | None = None,
        pipe_out: bool = False,
        pipe_in: bool = False,
        cwd: Path | None = None,
    ) -> asyncio.subprocess.Process:
        """Start ``args`` in its own session, dying with the bench; output to ``log`` or a pipe."""
        out: Any = asyncio.subprocess.PIPE if pipe_out else subprocess.DEVNULL
        fh = None
        if log is not None and not pipe_out:
            fh = open(log, "wb")  # noqa: SIM115 - handed to the child
            out = fh
        try:
            proc = await asyncio.create_subprocess_exec(
                *[str(a) for a in args],
                stdin=asyncio.subprocess.PIPE if pipe_in else subprocess.DEVNULL,
                stdout=out,
                stderr=fh if fh is not None else subprocess.STDOUT if pipe_out else out,
                start_new_session=True,  # Ctrl-C reaches us; we stop the children in order
                preexec_fn=_child_setup,
                cwd=str(cwd or self.workdir),
            )
        finally:
            if fh is not None:
                fh.close()
        self.items.append(proc)
        return proc

    async def helper(
        self, name: str, *args: str | Path, pipe_in: bool = False
    ) -> asyncio.subprocess.Process:
        """Start the bench's own helper process ``name`` (``_upstream``, ``_load``, ...).

        It runs as ``python -m bench NAME ...`` from the repository root, where the
        package is importable; its stdout is a pipe.
        """
        cmd = [sys.executable, "-m", "bench", name, *args]
        return await self.start(cmd, pipe_out=True, pipe_in=pipe_in, cwd=ROOT)

    async def stop(self, proc: asyncio.subprocess.Process, timeout: float = 5.0) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc in self.items:
            self.items.remove(proc)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(p) for p in list(self.items)), return_exceptions=True)

    def kill_all_now(self) -> None:
        """Last resort (synchronous): SIGKILL whatever is left."""
        for p in self.items:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()


@dataclass
class Proxy:
    """A running proxy: bare mitmdump, or axme-fw with its rules and state directories."""

    name: str
    proc: asyncio.subprocess.Process
    port: int
    ca: Path
    log: Path
    rules: Path | None = None
    state: Path | None = None
    started_s: float = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid


LISTEN_RE = re.compile(r"proxy listening at [^\s]*?:(\d+)")


async def wait_listening(proc: asyncio.subprocess.Process, log: Path, timeout: float) -> int:
    """The port the proxy logged it listens on; RuntimeError with the log's tail if it exits."""
    found: list[int] = []

    def check() -> bool:
        if proc.returncode is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"proxy exited with {proc.returncode}:\n{tail}")
        m = LISTEN_RE.search(log.read_text(errors="replace")) if log.exists() else None
        if m:
            found.append(int(m.group(1)))
        return bool(found)

    await wait_until(check, timeout, f"the proxy to listen ({log})", step=0.02)
    return found[0]


class Rig:
    """The benchmark's world: work directory, upstream, proxies, results."""

    def __init__(self, sizes: Sizes, workdir: Path) -> None:
        self.sizes = sizes
        self.workdir = workdir
        self.procs = Procs(workdir)
        self.up_http = 0
        self.up_https = 0
        self.upstream: asyncio.subprocess.Process | None = None
        self.upstream_ca = workdir / "upstream-ca.pem"
        self.proxies: dict[str, Proxy] = {}
        self.rows: list[Row] = []
        self.details: dict[str, Any] = {}
        self.errors: list[str] = []
        self.deadline = Deadline(sizes.budget)
        self.load_tool = "wrk" if shutil.which("wrk") else "python"

    # -------------------------------------------- upstream

    async def start_upstream(self) -> None:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        ca.cert_pem.write_to_path(str(self.upstream_ca))
        cert_path, key_path = self.workdir / "upstream-cert.pem", self.workdir / "upstream-key.pem"
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        cert.private_key_pem.write_to_path(str(key_path))
        proc = await self.procs.helper(
            "_upstream", "--cert", cert_path, "--key", key_path, pipe_in=True
        )
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        parts = line.decode().split()
        if len(parts) != 3 or parts[0] != "READY":
            raise RuntimeError(f"upstream did not start: {line!r}")
        self.up_http, self.up_https = int(parts[1]), int(parts[2])
        self.upstream = proc

    @property
    def target(self) -> str:
        return f"{HOST}:{self.up_http}"

    @property
    def target_tls(self) -> str:
        return f"{HOST}:{self.up_https}"

    async def upstream_order(self) -> dict[str, Any]:
        reader, writer = await asyncio.open_connection(HOST, self.up_http)
        try:
            writer.write(origin_get(self.target, "/_order"))
            _, _, body = await asyncio.wait_for(read_response(reader), 10)
        finally:
            writer.close()
        data: dict[str, Any] = json.loads(body)
        return data

    # -------------------------------------------- proxies

    async def bare(self, name: str = "bare", stream_sse: bool = False) -> Proxy:
        if name in self.proxies:
            return self.proxies[name]
        conf = self.workdir / name
        conf.mkdir(exist_ok=True)
        log = self.workdir / f"{name}.log"
        args: list[str | Path] = [
            BIN / "mitmdump",
            "--listen-host",
            HOST,
            "--listen-port",
            "0",
            "--set",
            "connection_strategy=lazy",
            "--set",
            "flow_detail=0",
            "--set",
            f"confdir={conf}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={self.upstream_ca}",
        ]
        if stream_sse:
            script = self.workdir / "stream_sse.py"
            script.write_text(
                "def responseheaders(flow):\n"
                "    if flow.response.headers.get('content-type', '')"
                ".startswith('text/event-stream'):\n"
                "        flow.response.stream = True\n"
            )
            args += ["-s", script]
        t0 = time.monotonic()
        proc = await self.procs.start(args, log=log)
        port = await wait_listening(proc, log, 30)
        proxy = Proxy(name, proc, port, conf / "mitmproxy-ca-cert.pem", log)
        proxy.started_s = time.monotonic() - t0
        self.proxies[name] = proxy
        return proxy

    async def firewall(
        self,
        name: str,
        agents: int,
        extra: Sequence[str] = (),
        files: Mapping[str, str] | None = None,
    ) -> Proxy:
        """axme-fw with ``agents`` generated agents, plus ``files`` (name → YAML) in its rules."""
        if name in self.proxies:
            return self.proxies[name]
        rules, state = self.workdir / f"{name}-rules", self.workdir / f"{name}-state"
        write_rules(rules, agents, self.sizes.actions, park_max=self.sizes.park_flows + 100)
        for fname, text in (files or {}).items():
            (rules / fname).write_text(text)
        state.mkdir(exist_ok=True)
        log = self.workdir / f"{name}.log"
        t0 = time.monotonic()
        proc = await self.procs.start(
            [
                BIN / "axme-fw",
                "run",
                "--rules",
                rules,
                "--state",
                state,
                "--listen-host",
                HOST,
                "--listen-port",
                "0",
                "--admin-listen",
                f"{HOST}:0",
                "--set",
                f"ssl_verify_upstream_trusted_ca={self.upstream_ca}",
                *extra,
            ],
            log=log,
        )
        port = await wait_listening(proc, log, 120)
        enforced = state / "enforced.json"
        await wait_until(enforced.exists, 30, f"{enforced}", step=0.02)
        proxy = Proxy(name, proc, port, state / "mitmproxy-ca-cert.pem", log, rules, state)
        proxy.started_s = time.monotonic() - t0
        self.proxies[name] = proxy
        return proxy

    async def stop_proxy(self, name: str) -> None:
        proxy = self.proxies.pop(name, None)
        if proxy is not None:
            await self.procs.stop(proxy.proc)

    async def cli(self, proxy: Proxy, *args: str, timeout: float = 15) -> tuple[int, str]:
        assert proxy.rules is not None and proxy.state is not None
        proc = await self.procs.start(
            [BIN / "axme-fw", *args, "--rules", proxy.rules, "--state", proxy.state],
            pipe_out=True,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        finally:
            await self.procs.stop(proc)
        return proc.returncode or 0, out.decode(errors="replace")

    # -------------------------------------------- requests

    async def request(
        self, proxy: Proxy, cred: Cred, path: str = "/", timeout: float = 10
    ) -> tuple[int, dict[str, str]]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, proxy.port), timeout)
        try:
            writer.write(proxied_get(self.target, path, cred.auth))
            status, headers, _ = await asyncio.wait_for(read_response(reader), timeout)
        finally:
            writer.close()
        return status, headers

    async def load(self, proxy: Proxy, mode: str, seconds: float, cred: Cred) -> dict[str, float]:
        """One bounded load run; the same generator for every proxy."""
        if mode == "http" and self.load_tool == "wrk":
            return await self.wrk(proxy, seconds, cred)
        target = self.target_tls if mode == "https" else self.target
        proc = await self.procs.helper(
            "_load",
            "--proxy-port",
            str(proxy.port),
            "--target",
            target,
            "--mode",
            mode,
            "--conns",
            str(self.sizes.conns),
            "--duration",
            str(seconds),
            "--warmup",
            "0.5",
            "--max-requests",
            str(int(seconds * 20000)),
            "--agent",
            cred.agent,
            "--token",
            cred.token,
            "--ca",
            proxy.ca,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
        finally:
            await self.procs.stop(proc)
        lines = out.decode().strip().splitlines()
        try:
            result: dict[str, float] = json.loads(lines[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"load generator failed: {out.decode()[-1500:]}") from None
        if result["errors"] > 0 and result["requests"] == 0:
            raise RuntimeError(f"every request failed through {proxy.name}: {result}")
        return result

    async def wrk(self, proxy: Proxy, seconds: float, cred: Cred) -> dict[str, float]:
        script = self.workdir / f"wrk-{cred.agent}.lua"
        script.write_text(
            'wrk.method = "GET"\n'
            f'wrk.path = "http://{self.target}/"\n'
            f'wrk.headers["Host"] = "{self.target}"\n'
            f'wrk.headers["Proxy-Authorization"] = "{cred.auth}"\n'
        )
        url = f"http://{HOST}:{proxy.port}/"
        base = ["wrk", "-t1", f"-c{self.sizes.conns}", "--latency", "-s", str(script)]
        # Warm-up (connections, caches), then the measured run.
        for dur, measured in ((1, False), (max(1, round(seconds)), True)):
            proc = await self.procs.start([*base, f"-d{dur}s", url], pipe_out=True)
            try:
                out_b, _ = await asyncio.wait_for(proc.communicate(), dur + 30)
            finally:
                await self.procs.stop(proc)
            if measured:
                return parse_wrk(out_b.decode(errors="replace"))
        raise AssertionError("unreachable")

    # -------------------------------------------- results

    def add(self, row: Row) -> None:
        self.rows.append(row)
        goal = f"  goal {row.goal}: {'ok' if row.ok else 'MISSED'}" if row.ok is not None else ""
        print(f"  {row.section:<10} {row.metric:<44} {fmt_row_values(row)}{goal}", flush=True)


def parse_wrk(text: str) -> dict[str, float]:
    """wrk's report as the load generator's result dict; RuntimeError when unusable."""

    def to_ms(value: str) -> float:
        m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value.strip())
        if not m:
            raise RuntimeError(f"cannot parse wrk latency {value!r}")
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]
        return float(m.group(1)) * scale

    rps = re.search(r"Requests/sec:\s*([\d.]+)", text)
    p50 = re.search(r"\s50%\s+(\S+)", text)
    p99 = re.search(r"\s99%\s+(\S+)", text)
    total = re.search(r"(\d+) requests in ([\d.]+)s", text)
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"cannot parse wrk output:\n{text[-1500:]}")
    errors = int(bad.group(1)) if bad else 0
    if errors > int(total.group(1)) // 100:
        raise RuntimeError(f"wrk: {errors} non-2xx responses:\n{text[-800:]}")
    return {
        "requests": float(total.group(1)),
        "errors": float(errors),
        "seconds": float(total.group(2)),
        "rps": float(rps.group(1)),
        "p50_ms": to_ms(p50.group(1)),
        "p99_ms": to_ms(p99.group(1)),
    }
