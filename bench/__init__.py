"""Benchmark package: axme-fw against bare mitmdump, side by side, in one run.

Usage: scripts/bench [--quick] [--check] [--only SECTION,...]

Sections (all by default, in this order):

- ``throughput``: req/s, p50/p99 over plain-HTTP keep-alive and HTTPS (CONNECT + TLS)
  to a fast local upstream; bare mitmdump (a) and the firewall with 1,000 agents and
  100 actions (b), interleaved a, b, a, b, ...
- ``sse``: time to first and last byte of an LLM-shaped event stream.
- ``kill``: 4 client processes of one agent; from starting ``axme-fw kill`` (or from
  renaming a prepared ``kill.yaml`` into place) to the first 403 seen by every one.
- ``park``: ``axme-fw pause``, N parked requests, ``axme-fw resume``: release time,
  arrival order at upstream, proxy RSS per parked flow.
- ``decision``: ``policy.decide`` with 10 / 1,000 / 10,000 agents, and req/s through
  the proxy with 10 vs 10,000 agents.
- ``reload``: from an atomic rename of a 10,000-agent rules file to the new rule
  being enforced.
- ``fleet``: 3 replicas sharing one redis-server: a kill to 3/3 acknowledgements
  (``axme-fw --redis kill``, admin API), and from the kill call to a 403 at 4 instances
  of one agent spread over the 3 replicas.
- ``redis``: one replica with and without ``--redis``: req/s for an agent with a
  request limit and one without (and bare mitmdump), and Redis commands per request.

Everything is loopback (127.0.0.1); every load loop is bounded in count and time;
every child process is stopped on exit, Ctrl-C included. Writes bench/results.json
and docs/benchmarks.md, prints the table, and with ``--check`` exits 1 when a goal
is missed.

Layout: ``__main__`` (the command line) runs one module per section (``throughput``,
``sse``, ``kill``, ``park``, ``decision``, ``reload``, ``fleet``, ``redis_cost``, each
with ``run(rig)``) over the shared rig: ``rig`` (child processes, proxies, load runs),
``common`` (paths, sizes, clocks, statistics), ``fixtures`` (agents, rules and kill
files), ``wire`` (HTTP/1.1 client bits), ``crowd`` (kill workers and what they saw),
``redis_server`` (the bench's redis-server and a MONITOR counter), ``report`` (rows,
table, results.json, benchmarks.md), and the helper processes ``upstream`` and
``workers`` (load generator, kill worker), started as ``python -m bench _upstream``,
``_load`` and ``_killworker``. (Section ``redis`` is the module ``redis_cost``.)
"""
