# syntax=docker/dockerfile:1
#
# callpipe image: one image for every role; the command picks the role
#   docker run callpipe:local ingress | worker start | worker end | setup | run
# Configuration comes from CALLPIPE_* environment variables (see docker-compose.yml).

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: install the project and its dependencies into a virtualenv ------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# The build context is filtered by .dockerignore (no .venv, .git, tests, caches).
COPY . .
# The dependencies at the versions CI passed with (constraints.txt). After installing,
# fail the build (not the container) if the entry point cannot import or the default
# Roistat time zone is missing from the base image.
RUN pip install -c constraints.txt . \
 && callpipe --help >/dev/null \
 && python -c "import zoneinfo; zoneinfo.ZoneInfo('Europe/Moscow')"

# ---- runtime: the virtualenv only, no sources, no pip caches, non-root -------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 callpipe \
 && useradd --system --uid 10001 --gid callpipe --create-home --home-dir /home/callpipe \
        --shell /usr/sbin/nologin callpipe \
 && mkdir -p /var/lib/callpipe/spool \
 && chown -R 10001:10001 /var/lib/callpipe

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/callpipe

EXPOSE 8080

# SIGTERM (Docker's default stop signal) makes ingress and workers drain in-flight work.
ENTRYPOINT ["callpipe"]
CMD ["run"]
