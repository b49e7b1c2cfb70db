# log-bridge image: receives WorkOS audit-log streams, journals them in SQLite and delivers them to the sinks.
#
#   docker build -t log-bridge .
#   docker run --rm -p 8443:8443 -e LOG_BRIDGE_TOKEN=... \
#     -v "$PWD/config.yaml:/etc/log-bridge/config.yaml:ro" -v log-bridge-journal:/var/lib/log-bridge log-bridge
#
# Stage 1 builds a virtual environment with log-bridge and every optional sink dependency. All of them ship
# binary wheels for this Python, so no compiler is needed; if one ever does not, install build-essential here,
# never in the final stage.
#
# BASE is the image both stages start from; it only changes where the official image cannot be pulled (the test
# suite builds on a Debian base it makes itself: tests/deploy/test_image.py).
ARG BASE=python:3.13-slim-trixie
FROM ${BASE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY receiver ./receiver
COPY sinks ./sinks
# Bytecode is compiled here, at build time, because the final root filesystem is read-only.
RUN /opt/venv/bin/pip install --no-cache-dir '.[all]' \
    && /opt/venv/bin/python -m compileall -q /opt/venv

# Stage 2: the runtime. Only the interpreter, the virtual environment and an unprivileged user.
FROM ${BASE}

LABEL org.opencontainers.image.title="log-bridge" \
      org.opencontainers.image.description="Receives WorkOS audit-log streams, journals them durably and delivers them to file, S3, Splunk HEC, Datadog, syslog and HTTP sinks." \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed UID/GID so volume ownership and Kubernetes' runAsUser/fsGroup can rely on it.
RUN groupadd --system --gid 10001 log-bridge \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin log-bridge \
    && mkdir -p /etc/log-bridge /var/lib/log-bridge \
    && chown 10001:10001 /var/lib/log-bridge

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LOG_BRIDGE_CONFIG=/etc/log-bridge/config.yaml \
    LOG_BRIDGE_HEALTHCHECK_URL=http://127.0.0.1:8443/healthz

# The journal (SQLite) and the file sink's output live here; everything else can be read-only.
VOLUME ["/var/lib/log-bridge"]
WORKDIR /var/lib/log-bridge
USER 10001:10001
EXPOSE 8443

# The slim image has no curl: Python's urllib fails (exit 1) on anything but a 2xx. With in-container HTTPS, set
# LOG_BRIDGE_HEALTHCHECK_URL=https://127.0.0.1:8443/healthz; the certificate is not checked on loopback. Under mutual
# TLS, point it at server.admin's plain-HTTP port instead (no client certificate is sent).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request; urllib.request.urlopen(os.environ['LOG_BRIDGE_HEALTHCHECK_URL'], timeout=4, context=ssl._create_unverified_context())"]

ENTRYPOINT ["log-bridge", "serve"]
CMD ["--config", "/etc/log-bridge/config.yaml"]
