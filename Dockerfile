#   docker build --build-arg REVISION="$(git rev-parse HEAD)" -t conntrack-exporter .
#
# README.md says how to run it, with CAP_NET_ADMIN (netlink) and without (procfs).
#
# Both stages start from PYTHON_IMAGE. Any image with python3 (3.11 or later) and its venv
# module will do: the official python images, or a Debian/Ubuntu one with python3 and
# python3-venv (tests/fixtures/make_base_image.sh makes one where no registry is reachable).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# A package index other than PyPI (a mirror or a proxy); empty means PyPI. pip reads it from
# the environment and ignores it when empty.
ARG PIP_INDEX_URL=""
# The source revision, for --version and conntrack_exporter_build_info: the build context has
# no .git, so it comes from here (setup.py writes it into the package); empty: "unknown".
ARG REVISION=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY conntrack_exporter/ conntrack_exporter/
# The package is built as a wheel (pip builds it in an isolated environment with setuptools
# from the index), then installed with its dependencies into a venv made without pip:
# /opt/conntrack-exporter is everything the final stage takes. The bcrypt extra checks the
# passwords of --web.config.file's basic_auth_users. The last line proves the entry point runs.
RUN python3 -m venv /opt/build \
 && CONNTRACK_EXPORTER_REVISION="${REVISION}" \
    /opt/build/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && python3 -m venv --without-pip /opt/conntrack-exporter \
 && /opt/build/bin/pip --python /opt/conntrack-exporter/bin/python3 install "$(echo /wheels/*.whl)[bcrypt]" \
 && /opt/conntrack-exporter/bin/conntrack-exporter --version

FROM ${PYTHON_IMAGE}
# The package's version (conntrack_exporter.__version__); a test keeps the two in step.
ARG VERSION=0.1.0
ARG REVISION=""
LABEL org.opencontainers.image.title="conntrack-exporter" \
      org.opencontainers.image.description="Prometheus exporter for Linux connection tracking and socket resource exhaustion" \
      org.opencontainers.image.source="https://github.com/conntrack-exporter/conntrack-exporter" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
# The venv only: no compiler, no build tools, no wheels, no pip cache, no source tree. Its
# python3 is a symlink to the base image's, which is the same in both stages.
COPY --from=build /opt/conntrack-exporter /opt/conntrack-exporter
ENV PATH=/opt/conntrack-exporter/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Least privilege by default (nobody): conntrack is then read from /proc. Reading it over
# netlink, and the table scan, need CAP_NET_ADMIN, which Docker and Kubernetes grant to root
# only (podman to any user): run with --user 0 --cap-drop ALL --cap-add NET_ADMIN.
USER 65534:65534
EXPOSE 9371
# No HEALTHCHECK: Kubernetes probes /healthz itself, and the image has no HTTP client to run
# one with (curl or wget would be added for that alone).
ENTRYPOINT ["conntrack-exporter"]
