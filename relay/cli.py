"""The ``relay`` command: ``relay serve``, ``relay settings``."""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

from relay import config
from relay.config import Settings


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark suite has its own options: hand them over
        from benchmarks.__main__ import main as bench

        sys.exit(bench(argv[1:]))
    parser = argparse.ArgumentParser(prog="relay", description="multiplayer game state relay")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the relay",
        description="Run the relay. Every option can also be set as RELAY_<NAME>.",
    )
    for f in config.fields():
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default != "" else "none"
        help_text = f"{f.metadata['doc']} [default: {default}; env RELAY_{f.name.upper()}]"
        if f.name == "rules":
            help_text += "; repeatable, added to the defaults (--rules none drops them)"
            serve.add_argument(flag, dest=f.name, action="append", metavar="TYPE=MODULE:CLASS", help=help_text)
            continue
        serve.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)
    commands.add_parser("settings", help="print the settings table (markdown)")
    commands.add_parser("bench", help="run the benchmarks (python -m benchmarks; see --help there)")
    token = commands.add_parser("token", help="print a signed player token (JWT HS256)")
    token.add_argument("--secret", required=True, help="the relay's --secret")
    token.add_argument("--player", required=True, help="the player id the token names")
    token.add_argument("--room", action="append", help="room pattern it may join (glob; repeatable; default *)")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires [default: 3600]")
    token.add_argument("--name", help="display name carried in the player's meta")
    args = parser.parse_args(argv)

    if args.command == "settings":
        print(config.table_markdown())
        return
    if args.command == "token":
        from relay import auth

        print(auth.issue(args.secret, args.player, rooms=args.room, ttl_s=args.ttl, name=args.name))
        return
    if args.rules:
        args.rules = ",".join([Settings.from_env().rules, *args.rules])
    overrides = {}
    for f in config.fields():
        raw = getattr(args, f.name)
        if raw is not None:
            try:
                overrides[f.name] = config.parse(f, raw)
            except ValueError as exc:
                parser.error(str(exc))
    try:
        settings = Settings.from_env(**overrides)
    except ValueError as exc:
        parser.error(str(exc))
    check(settings, parser)
    port_taken = taken(settings.host, settings.port)
    if port_taken:
        sys.exit(f"relay: cannot listen on {settings.host}:{settings.port} ({port_taken}); another relay? Pick a port with --port N")
    from relay.runner import serve as run

    print(
        f"relay: starting on ws://{settings.host}:{settings.port}/ws/{{room}} "
        f"(backplane: {'redis' if settings.redis else 'memory'}, workers: {settings.workers})",
        file=sys.stderr,
        flush=True,
    )
    try:
        run(settings)
    except KeyboardInterrupt:  # Ctrl+C: uvicorn has shut down gracefully, then raised it again
        pass


def taken(host: str, port: int) -> str | None:
    """Why the relay could not listen there (to say so before starting up), or None.

    uvicorn binds only after the app has started, and then logs a bare errno."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return str(exc)
    for family, kind, proto, _, address in infos[:1]:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            try:
                probe.bind(address)
            except OSError as exc:
                return exc.strerror or str(exc)
    return None


def check(settings: Settings, parser: argparse.ArgumentParser) -> None:
    """Refuse settings this version cannot honour, rather than ignore them."""
    if settings.redis and not settings.redis.startswith(("redis://", "rediss://", "unix://")):
        parser.error("--redis must be a redis://, rediss:// or unix:// URL")
    from relay.rules.base import load, parse_rules_setting

    try:
        for spec in parse_rules_setting(settings.rules).values():
            load(spec)
    except ValueError as exc:
        parser.error(str(exc))
    if settings.workers > 1 and not settings.redis:
        parser.error("--workers > 1 needs --redis: in memory, processes cannot share rooms")
    if settings.outbox_soft_bytes > settings.outbox_hard_bytes:
        parser.error("--outbox-soft-bytes must not exceed --outbox-hard-bytes")
    if settings.max_message_bytes > settings.max_frame_bytes:
        parser.error("--max-message-bytes must not exceed --max-frame-bytes")
