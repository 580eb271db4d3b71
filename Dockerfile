# axme-fw: the egress firewall as a container image.
#
#   docker build -t axme-fw .
#   docker run -p 8080:8080 -p 127.0.0.1:8081:8081 -v $PWD/rules:/rules -v axme-state:/state axme-fw
#
# Agents point HTTP(S)_PROXY at :8080 and trust /state/mitmproxy-ca-cert.pem (share the
# state volume read-only, or copy that file). The admin API is on :8081.
FROM python:3.13-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid so volumes and Kubernetes' runAsUser agree with the image.
RUN groupadd --system --gid 10001 axme \
 && useradd --system --uid 10001 --gid axme --home-dir /home/axme --create-home axme

WORKDIR /src
COPY pyproject.toml README.md ./
COPY addon ./addon
RUN pip install . && rm -rf /src

# The example rules seed an empty /rules volume (Docker copies image content into a new
# named volume). The rules directory must stay writable: kill.yaml lives there.
COPY --chown=axme:axme rules /rules
RUN mkdir -p /state && chown axme:axme /state
VOLUME ["/rules", "/state"]
ENV AXME_FW_RULES=/rules \
    AXME_FW_STATE=/state \
    HOME=/home/axme
WORKDIR /home/axme

USER axme
EXPOSE 8080 8081

# /readyz answers 200 once the rules are loaded and state and audit are writable.
# ProxyHandler({}): never through a proxy, even if the container has HTTP_PROXY set.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8081/readyz', timeout=2).status != 200)"]

# The proxy listens on every interface of the container; so does the admin API, so that
# the health check above and `axme-fw --server` from the host reach it. --admin-insecure:
# plain HTTP for the admin API (use --admin-cert/--admin-key for TLS off loopback). Publish 8081 on the
# host's loopback only (-p 127.0.0.1:8081:8081), or replace these two arguments with the
# admin TLS options when you serve it further.
ENTRYPOINT ["axme-fw", "run", "--listen-host", "0.0.0.0"]
CMD ["--admin-listen", "0.0.0.0:8081", "--admin-insecure"]
