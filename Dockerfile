# syntax=docker/dockerfile:1
#
# selfserve API and worker image (one image, two commands).
#
#   docker build -t selfserve .
#
#   # apply migrations once per release, before starting new processes
#   docker run --rm --env-file selfserve.env selfserve selfserve db migrate
#
#   # the API (default command): stateless, run as many as you need
#   docker run -d --env-file selfserve.env -p 8000:8000 selfserve
#
#   # the background worker (arq): same image, different command; it serves no
#   # HTTP, so turn the image's HTTP health check off for it
#   docker run -d --env-file selfserve.env --no-healthcheck selfserve selfserve worker
#
# selfserve.env holds at least DATABASE_URL, REDIS_URL, SELFSERVE_PUBLIC_BASE_URL and
# SELFSERVE_JWT_SECRET (see README.md, "Configuration"). The image runs as production
# and leaves out the embedded servers (the `embedded` extra is for development).

# --- build: a wheel of selfserve, installed with its dependencies into a venv ---
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /build
RUN python -m venv /opt/selfserve

# Dependencies and sources; .dockerignore keeps everything else out of the context.
COPY pyproject.toml README.md ./
COPY src ./src
COPY migrations ./migrations
COPY channels ./channels

RUN /opt/selfserve/bin/pip wheel --no-deps --wheel-dir /build/dist . \
 && /opt/selfserve/bin/pip install /build/dist/selfserve-*.whl

# --- runtime: the venv only, as an unprivileged user ---
FROM python:3.11-slim AS runtime

ENV PATH=/opt/selfserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SELFSERVE_ENV=production \
    SELFSERVE_LOG_FORMAT=json

RUN groupadd --system --gid 10001 selfserve \
 && useradd --system --uid 10001 --gid selfserve --home-dir /nonexistent \
        --no-create-home --shell /usr/sbin/nologin selfserve

COPY --from=builder /opt/selfserve /opt/selfserve

USER 10001:10001

EXPOSE 8000

# Liveness: /health does no I/O. The slim image has no curl, so Python asks.
# (If you change the port with `selfserve serve --port`, change it here too.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

CMD ["selfserve", "serve"]
