"""CLI: ``axme-fw run``: mitmproxy's DumpMaster with the firewall addon, until SIGINT/SIGTERM.

Not ``mitmdump -s``: the script loader reloads an addon when its file changes, which
would drop in-memory state (parked flows, counters).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mitmproxy import exceptions, options
from mitmproxy.tools.dump import DumpMaster

from .firewall import Firewall


class JsonLines(logging.Formatter):
    """One JSON object per record (``--log-format json``), for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def serve(
    rules: Path,
    state: Path,
    host: str,
    port: int,
    sets: Sequence[str] = (),
    log_format: str = "console",
) -> int:
    """Run the proxy; returns the exit code (1 when options or rules are refused)."""

    async def main() -> int:
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        as_json = log_format == "json"
        if as_json:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(JsonLines())
            JsonLines.converter = time.gmtime
            root.addHandler(handler)
        opts = options.Options()
        master = DumpMaster(opts, with_termlog=not as_json, with_dumper=False)
        master.addons.add(Firewall())
        try:
            opts.update(
                listen_host=host,
                listen_port=port,
                confdir=str(state),
                connection_strategy="lazy",
                axme_state=str(state),
                axme_rules=str(rules),
            )
        except Exception as exc:  # OptionsError wraps our rules errors
            print(str(exc).removeprefix("Error in axme_fw: ").strip(), file=sys.stderr)
            return 1
        try:
            opts.set(*sets)  # "option=value" strings, parsed by mitmproxy like --set
        except exceptions.OptionsError as exc:
            print(f"axme-fw: --set: {exc}", file=sys.stderr)
            return 2
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, master.shutdown)
        await master.run()
        return 0

    return asyncio.run(main())
