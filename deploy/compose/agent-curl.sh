#!/bin/sh
# A curl loop: its status, then one allowed and one refused request, every 2 seconds.
# Kill it from the host (`axme-fw --server ... kill curl-agent`) and watch the 403s.
while true; do
  curl -s http://axme-fw.local/status; echo
  curl -s -o /dev/null -w "fake-llm /v1/models -> %{http_code}\n" http://fake-llm:8000/v1/models
  curl -s -o /dev/null -w "pypi.org (not allowed) -> %{http_code}\n" https://pypi.org/simple/
  sleep 2
done
