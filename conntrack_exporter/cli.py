"""Command line: node_exporter-style flags, configuration, logging, and the process lifecycle.

Exit status: 0 on a clean stop (or after --once), 1 when the server cannot start, 2 when the
flags or the configuration file are invalid.
"""

from __future__ import annotations

import argparse
import logging
import platform
import resource
import signal
import sys
import threading
import typing
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client.exposition import generate_latest

from conntrack_exporter import __version__
from conntrack_exporter.collectors import COLLECTORS
from conntrack_exporter.config import Config, ConfigError, LogConfig, load_config
from conntrack_exporter.logs import setup_logging
from conntrack_exporter.process import ProcessMetrics
from conntrack_exporter.procfs import ProcFS
from conntrack_exporter.registry import (
    CollectorContext,
    CollectorSet,
    ConfigReloads,
    ExporterCollector,
    Lasting,
    Readers,
)
from conntrack_exporter.revision import revision
from conntrack_exporter.server import MetricsServer
from conntrack_exporter.webconfig import PLAIN_HTTP, WebSecuritySource, WebSecurityWatcher

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# The longest a signal waits for its handler (see Running.serve).
SIGNAL_CHECK_SECONDS = 1.0
DEFAULTS = Config()

# flag -> (dotted config key, help)
VALUE_FLAGS = {
    "--web.listen-address": (
        "web.listen_address",
        f"address to listen on, host:port; ':port' for every interface "
        f"(default {DEFAULTS.web.listen_address!r})",
    ),
    "--web.telemetry-path": (
        "web.telemetry_path",
        f"path under which to expose metrics (default {DEFAULTS.web.telemetry_path!r})",
    ),
    "--web.config.file": (
        "web.config_file",
        "web configuration file in the format of Prometheus' exporter-toolkit: TLS and basic "
        "authentication (see the README); a changed file, certificate, key or CA applies to "
        "new connections within a second, no restart needed",
    ),
    "--path.procfs": (
        "path.procfs",
        f"procfs mount point; its net/ and sys/net/ show the exporter's own network namespace "
        f"(default {DEFAULTS.path.procfs!r})",
    ),
}


def _choices(cls: type, field: str) -> list[str]:
    return list(typing.get_args(typing.get_type_hints(cls)[field]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conntrack-exporter",
        description="Prometheus exporter for Linux connection tracking and socket resources. "
        "Reads the kernel over netlink (needs CAP_NET_ADMIN) and falls back to /proc "
        "without it. Flags override the configuration file, which overrides the defaults.",
        epilog="collectors: "
        + ", ".join(
            f"{name} ({'on' if c.default_enabled else 'off'} by default)"
            for name, c in COLLECTORS.items()
        ),
    )
    for flag, (key, help_text) in VALUE_FLAGS.items():
        parser.add_argument(flag, dest=key, metavar=key.rsplit(".", 1)[1].upper(), help=help_text)
    parser.add_argument(
        "--web.max-requests",
        dest="web.max_requests",
        type=int,
        metavar="N",
        help=f"places in the scrape queue; past them, or past a client address's quarter of "
        f"them, a scrape gets 503 at once; 0 for no limit (default {DEFAULTS.web.max_requests})",
    )
    parser.add_argument(
        "--config.file",
        dest="config_file",
        metavar="FILE",
        help="YAML configuration file (see config.example.yml); SIGHUP re-reads it",
    )
    for name, collector in COLLECTORS.items():
        dest = f"collectors.{name}.enabled"
        parser.add_argument(
            f"--collector.{name}",
            dest=dest,
            action="store_const",
            const=True,
            help=f"enable the {name} collector "
            f"({'on' if collector.default_enabled else 'off'} by default)",
        )
        parser.add_argument(
            f"--no-collector.{name}",
            dest=dest,
            action="store_const",
            const=False,
            help=f"disable the {name} collector",
        )
    parser.add_argument(
        "--collector.disable-defaults",
        dest="collectors.disable_defaults",
        action="store_const",
        const=True,
        help="disable every collector not enabled explicitly by flag or file",
    )
    parser.add_argument(
        "--log.level",
        dest="log.level",
        choices=_choices(LogConfig, "level"),
        help=f"log level (default {DEFAULTS.log.level})",
    )
    parser.add_argument(
        "--log.format",
        dest="log.format",
        choices=_choices(LogConfig, "format"),
        help=f"log format (default {DEFAULTS.log.format})",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="collect once, write the metrics to standard output and exit (exit status 0 even "
        "if a collector failed: see conntrack_exporter_collector_success)",
    )
    parser.add_argument(
        "--version",
        action="store_true",
        help="show the version, the source revision and the Python this runs on, and exit",
    )
    return parser


def version_text() -> str:
    """--version, in node_exporter's shape."""
    return (
        f"conntrack-exporter, version {__version__} (revision: {revision()})\n"
        f"  python version:   {platform.python_version()} ({platform.python_implementation()})\n"
        f"  platform:         {sys.platform}/{platform.machine()}\n"
    )


def _flag_values(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    # The first flag that writes each key names it in error messages.
    flags: dict[str, str] = {}
    for action in parser._actions:
        flags.setdefault(action.dest, action.option_strings[0] if action.option_strings else "")
    return {
        key: (flags[key], value)
        for key, value in vars(args).items()
        if "." in key and value is not None
    }


def build_collectors(config: Config, lasting: Lasting) -> CollectorSet:
    """The enabled collectors, not yet started (see CollectorSet); `lasting` is the state
    kept across reloads."""
    context = CollectorContext(
        ProcFS(config.path.procfs), Readers.netlink(config.netlink.timeout_seconds), lasting
    )
    return CollectorSet(
        [
            COLLECTORS[name](config.collectors[name].options, context)
            for name in config.enabled_collectors
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        sys.stdout.write(version_text())
        return EXIT_OK
    flags = _flag_values(args, parser)
    try:
        config, security = _load(args.config_file, flags)
    except ConfigError as exc:
        count = len(exc.problems)
        sys.stderr.write(
            f"conntrack-exporter: invalid configuration ({count} problem{'s' * (count != 1)}):\n"
            + "".join(f"  {problem}\n" for problem in exc.problems)
        )
        return EXIT_USAGE
    setup_logging(config.log.level, config.log.format)
    _raise_open_files_limit()
    lasting = Lasting()
    collectors = build_collectors(config, lasting)
    reloads = ConfigReloads()
    # The process's own metrics (CPU, memory, open fds, start time) from its own /proc, whatever
    # path.procfs says.
    process = ProcessMetrics()
    exporter = ExporterCollector(collectors, (process, reloads))
    try:
        if args.once:
            try:
                collectors.scanner.run_once()
                sys.stdout.write(generate_latest(exporter).decode())
            finally:
                collectors.close()
            return EXIT_OK
        running = Running(config, exporter, security, lasting, reloads)
        return running.serve(lambda: _load(args.config_file, flags))
    finally:
        process.close()


def _raise_open_files_limit() -> None:
    """The soft limit on open files up to the hard one, as Go does for node_exporter: the pods
    collector holds an fd per counter file of every network namespace, and a soft limit of
    1024 (systemd's default) would stop it near 150 pods."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:  # an unlimited hard limit is above fs.nr_open
        log.debug("open files limit stays at %d (hard limit %d): %s", soft, hard, exc)
    else:
        log.debug("open files limit raised from %d to %d", soft, hard)


def _load(file: str | None, flags: dict[str, Any]) -> tuple[Config, WebSecuritySource]:
    config = load_config(file, flags, COLLECTORS)
    web_file = config.web.config_file
    return config, WebSecurityWatcher(web_file) if web_file else PLAIN_HTTP


# Web settings a reload cannot change: the listening socket and the server's limits are made
# once, at start-up.
RESTART_ONLY_WEB_SETTINGS = (
    "listen_address",
    "max_requests",
    "max_connections",
    "read_timeout_seconds",
)


class Running:
    """The serving exporter: its configuration, collectors, scanner and server, and the
    signals that stop it (SIGTERM, SIGINT) or reload its configuration (SIGHUP)."""

    def __init__(
        self,
        config: Config,
        exporter: ExporterCollector,
        security: WebSecuritySource,
        lasting: Lasting,
        reloads: ConfigReloads | None = None,
    ) -> None:
        self.config = config
        self.exporter = exporter
        self.security = security
        self.lasting = lasting
        self.reloads = reloads or ConfigReloads()
        self._wake = threading.Event()
        self._stop = False
        self._reload = False

    def serve(self, load: Callable[[], tuple[Config, WebSecuritySource]]) -> int:
        config = self.config
        try:
            server = MetricsServer(config.web, self.exporter, self.security)
        except OSError as exc:
            log.error(
                "cannot listen", extra={"address": config.web.listen_address, "err": exc.strerror}
            )
            return EXIT_FAILURE
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGHUP, self._request_reload)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True
        )
        thread.start()
        self.exporter.active.start()
        log.info(
            "listening",
            extra={
                "address": server.bound_address,
                "telemetry_path": config.web.telemetry_path,
                "collectors": ",".join(config.enabled_collectors) or "none",
                "tls": self.security.current().tls is not None,
                "basic_auth": self.security.current().auth is not None,
                "version": __version__,
                "revision": revision(),
            },
        )
        while not self._stop:
            # Not an endless wait: Python runs a signal's handler in the main thread, but the
            # kernel may deliver the signal to another thread (one whose turn it is, say while
            # the main thread is stopped under a tracer), which does not interrupt this wait.
            # Waking each second runs a handler left pending that way.
            self._wake.wait(SIGNAL_CHECK_SECONDS)
            self._wake.clear()
            if self._reload and not self._stop:
                self._reload = False
                self._reload_config(load, server)
        server.shutdown()
        server.server_close()
        self.exporter.active.close()
        return EXIT_OK

    def _request_stop(self, signum: int, _frame: object) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        self._stop = True
        self._wake.set()

    def _request_reload(self, _signum: int, _frame: object) -> None:
        self._reload = True
        self._wake.set()

    def _reload_config(
        self, load: Callable[[], tuple[Config, WebSecuritySource]], server: MetricsServer
    ) -> None:
        """Apply a new configuration file, or keep the running one if it has any problem."""
        try:
            config, security = load()
        except ConfigError as exc:
            self.reloads.failed()
            log.error(
                "configuration reload failed; the running configuration stays",
                extra={"problems": "; ".join(exc.problems)},
            )
            return
        setup_logging(config.log.level, config.log.format)
        collectors = build_collectors(config, self.lasting)
        # Old scans end before new ones start (never two at once), and the old collectors
        # are closed, after the scrapes still using them, before anything new runs.
        self.exporter.replace(collectors).close()
        collectors.start()
        server.security = security
        server.telemetry_path = config.web.telemetry_path
        need_restart = [
            name
            for name in RESTART_ONLY_WEB_SETTINGS
            if getattr(config.web, name) != getattr(self.config.web, name)
        ]
        if need_restart:
            log.warning(
                "configuration reloaded, but these web settings take effect at the next start",
                extra={"settings": ",".join(f"web.{name}" for name in need_restart)},
            )
        self.config, self.security = config, security
        self.reloads.succeeded()
        log.info(
            "configuration reloaded",
            extra={"collectors": ",".join(config.enabled_collectors) or "none"},
        )
