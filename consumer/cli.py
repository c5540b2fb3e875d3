"""`perkamo-webhooks` command line: run, migrate, topics, settings, health, receiver, demo,
console-link."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from consumer import logsetup
from consumer.config import Settings, load_settings
from consumer.errors import ConfigError, PerkamoError

log = logging.getLogger("consumer.cli")

ROLES = ("deliver", "history", "all")
# A process that cannot start because a setting is wrong (sysexits' EX_CONFIG): the
# supervisor does not restart it, and neither should a process manager.
EXIT_CONFIG = 78


def _run(args: argparse.Namespace, settings: Settings) -> int:
    """`all`, or several deliver workers: a supervisor of child processes; one role: in-process."""
    # Until serve() installs the draining handler, nothing is in flight: a SIGTERM during
    # start-up is a clean stop (exit 0), not a kill by signal.
    signal.signal(signal.SIGTERM, _stop_during_start_up)
    if args.workers < 1:
        raise PerkamoError("--workers must be at least 1")
    if args.role == "all" or (args.role == "deliver" and args.workers > 1):
        from consumer.supervisor import Supervisor, children_for

        return Supervisor(children_for(args.role, args.workers), settings.drain_timeout_s).run()
    logsetup.configure(settings.log_level, settings.log_format, tag=_tag(args.role, args.worker))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.role == "deliver":
        from consumer.deliver_role import build_deliver, serve_deliver

        asyncio.run(serve_deliver(build_deliver(settings, worker=args.worker)))
    else:
        from consumer.history_role import build_history, serve_history

        asyncio.run(serve_history(build_history(settings)))
    return 0


def _tag(role: str, worker: int) -> str:
    return role if role == "history" else f"{role}-{worker}"


def _stop_during_start_up(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.history import HistoryStore

    store = HistoryStore.from_settings(settings)
    for line in store.migrate(settings.history_ttl_days):
        print(line)
    return 0


def _topics(args: argparse.Namespace, settings: Settings) -> int:
    """Create what is missing, keep max.message.bytes and min.insync.replicas in step on what
    exists, then print what the broker reports (read back, not what was asked)."""
    from consumer.kafka_admin import topic_state
    from consumer.kafka_topics import ensure_topics
    from consumer.topics import plan

    specs, warnings = plan(settings, args.partitions, args.retention_hours)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    created = ensure_topics(
        settings,
        [(s.name, s.partitions, s.config) for s in specs],
        replication_factor=args.replication_factor,
    )
    state = topic_state(settings, [s.name for s in specs])
    for spec in specs:
        state_word = "created" if spec.name in created else "exists"
        config = state.configs.get(spec.name, {})
        print(f"{spec.name:40} {spec.partitions:3} partitions  {state_word:7}  "
              f"replicas={state.replicas.get(spec.name, 0)}  "
              f"min.insync.replicas={config.get('min.insync.replicas', '?')}  "
              f"max.message.bytes={config.get('max.message.bytes', '?')}")
    return 0


def _settings(args: argparse.Namespace, settings: Settings) -> int:
    for name, value in settings.describe().items():
        print(f"{name}={value}")
    return 0


def _health(args: argparse.Namespace, settings: Settings) -> int:
    """GET /healthz (or /readyz) on the role's own listener: the history role (and `all`) on
    PERKAMO_ADMIN_LISTEN, a deliver worker on PERKAMO_DELIVER_ADMIN_LISTEN (port + worker), so
    one image's HEALTHCHECK serves either role."""
    if args.role == "deliver":
        host, port = settings.deliver_host_port(args.worker)
    else:
        host, port = settings.admin_host_port
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind is probed on loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    path = "/readyz" if args.ready else "/healthz"
    url = f"http://{host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            ok = response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        ok = False
    print("ok" if ok else "not ok")
    return 0 if ok else 1


def _receiver(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.receiver import SampleReceiver

    host, _, port = args.listen.rpartition(":")

    async def main() -> None:
        receiver = SampleReceiver(Path(args.cert_dir), hostnames=tuple(args.hostname))
        await receiver.start(host.strip("[]"), int(port))
        print(f"receiving on https://{args.listen}/webhooks/ok (CA: {receiver.ca_file})", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    return 0


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.demo import run_demo

    return run_demo(Path(args.dir), events=args.events, stay=args.console)


def _console_link(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.console import console_link
    from consumer.console.base import valid_slug
    from consumer.setting_values import CONSOLE_MAX_TTL_S, parse_duration

    try:
        ttl_s = parse_duration(args.ttl)
    except ValueError as exc:
        print(f"perkamo-webhooks console-link: --ttl {exc}", file=sys.stderr)
        return 2
    if ttl_s > CONSOLE_MAX_TTL_S or not valid_slug(args.space):
        problem = "--ttl must be at most 30d" if ttl_s > CONSOLE_MAX_TTL_S else \
            f"--space {args.space!r} is not a Space slug"
        print(f"perkamo-webhooks console-link: {problem}", file=sys.stderr)
        return 2
    try:
        print(console_link(settings, args.space, ttl_s))
    except ValueError as exc:
        print(f"perkamo-webhooks console-link: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perkamo-webhooks",
        description="Deliver Perkamo events from Kafka to customers' HTTPS webhook endpoints.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_service_commands(sub)
    _add_local_commands(sub)
    _add_console_link(sub)

    from consumer import cli_endpoints, cli_history

    cli_endpoints.add_subcommands(sub)
    cli_history.add_subcommands(sub)
    return parser


def _add_service_commands(sub: Any) -> None:
    """`run`, `migrate`, `topics`, `settings`, `health`: running and operating the service."""
    run = sub.add_parser(
        "run",
        help="run the service (SIGTERM drains and exits 0)",
        description="deliver: consume events and retries, make the HTTP calls, publish attempt "
        "records (no history store in the process). history: write attempt records to "
        "ClickHouse and serve the history API, resend, replay and the console. all (default): "
        "one history process and --workers deliver processes, supervised.",
    )
    run.add_argument("--role", choices=ROLES, default="all")
    run.add_argument("--workers", type=int, default=1, help="deliver processes (default 1)")
    run.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # set by the supervisor
    run.set_defaults(fn=_run)
    sub.add_parser("migrate", help="create or upgrade the history schema").set_defaults(fn=_migrate)

    topics = sub.add_parser(
        "topics",
        help="create every Kafka topic the service uses; set max.message.bytes and "
        "min.insync.replicas on existing ones",
        description="Creates missing topics; on every topic sets max.message.bytes to the size "
        "budget of PERKAMO_MAX_PAYLOAD_BYTES and min.insync.replicas to min(2, replicas), then "
        "prints both as the broker reports them. Each role checks them at start-up.",
    )
    topics.add_argument("--partitions", type=int, default=6)
    topics.add_argument("--replication-factor", type=int, default=1)
    topics.add_argument(
        "--retention-hours",
        type=float,
        default=None,
        help="retention of event and retry topics (default: 7 days or 2x the longest tier)",
    )
    topics.set_defaults(fn=_topics)

    sub.add_parser("settings", help="print every setting (secrets masked)").set_defaults(fn=_settings)

    health = sub.add_parser(
        "health",
        help="probe a running role's /healthz (or /readyz); exit 0 if healthy",
        description="history (the default, also `run --role all`): PERKAMO_ADMIN_LISTEN; "
        "deliver: PERKAMO_DELIVER_ADMIN_LISTEN, port + --worker. A wildcard address is probed "
        "on loopback.",
    )
    health.add_argument("--ready", action="store_true", help="probe /readyz instead of /healthz")
    health.add_argument("--role", choices=("deliver", "history"), default="history",
                        help="whose listener to probe (default history)")
    health.add_argument("--worker", type=int, default=0,
                        help="deliver worker index of `run --workers N` (default 0)")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(fn=_health)


def _add_local_commands(sub: Any) -> None:
    """`receiver` and `demo`: trying the service out on one machine."""
    receiver = sub.add_parser("receiver", help="a sample HTTPS webhook receiver with a test CA")
    receiver.add_argument("--listen", default="127.0.0.1:8443")
    receiver.add_argument("--cert-dir", default="data/receiver")
    receiver.add_argument("--hostname", action="append", default=["localhost", "127.0.0.1", "::1"])
    receiver.set_defaults(fn=_receiver)

    demo = sub.add_parser("demo", help="local broker + consumer + receiver + sample events, then history")
    demo.add_argument("--dir", default=".data/demo", help="working folder (recreated)")
    demo.add_argument("--events", type=int, default=20)
    demo.add_argument("--console", action="store_true",
                      help="after the history, keep the consumer serving the console until Ctrl+C")
    demo.set_defaults(fn=_demo)


def _add_console_link(sub: Any) -> None:
    """`console-link`: a signed URL into the delivery console for one Space."""
    link = sub.add_parser(
        "console-link",
        help="print a signed, expiring URL that opens the delivery console for one Space only",
        description="The link is signed with PERKAMO_CONSOLE_SECRET (or a key derived from "
        "PERKAMO_ADMIN_TOKEN); the URL starts with PERKAMO_CONSOLE_URL. Anyone holding it sees "
        "that Space's deliveries and endpoint (never its URL) and can resend and replay them, "
        "until it expires. Rotating the secret revokes every link.",
    )
    link.add_argument("--space", required=True, help="the Space's slug")
    link.add_argument("--ttl", default="24h", help="how long the link works: 30m, 24h, 7d (at most 30d)")
    link.set_defaults(fn=_console_link)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except PerkamoError as exc:
        print(f"perkamo-webhooks: {exc}", file=sys.stderr)
        return 2
    logsetup.configure(settings.log_level, settings.log_format)
    try:
        return int(args.fn(args, settings))
    except ConfigError as exc:  # a setting is wrong (refused credentials included): no retry helps
        log.error("%s", exc)
        return EXIT_CONFIG
    except PerkamoError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
