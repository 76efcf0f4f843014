"""`sserelay apikeys create | list | revoke`: API keys, in the Redis store the servers use.

Without Redis a server keeps its keys in its own memory, which no other process can
reach: the commands refuse with one line and point at the admin routes instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable

from pydantic import ValidationError

from auth import ApiKeyRecord, ApiKeys, ApiKeyStoreUnavailable, RedisApiKeyStore

from .cli_auth import duration
from .config import ConfigError, load_config
from .redis_client import redis_clients
from .settings import Settings

NO_REDIS = (
    "sserelay: apikeys needs SSERELAY_REDIS_URL: without Redis a server keeps its keys in "
    "its own memory; use its admin routes instead (POST/GET/DELETE /v1/admin/apikeys)"
)


def _fail(message: str, code: int = 2) -> int:
    print(f"sserelay: {message}", file=sys.stderr)
    return code


def _when(value: float | None) -> str:
    if value is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    except (OverflowError, OSError, ValueError):  # a record written by a buggy writer
        return str(value)


async def _create(args: argparse.Namespace, keys: ApiKeys) -> int:
    try:
        key, record = await keys.create(args.sub, args.plan, name=args.name, ttl_s=args.expires)
    except ValueError as exc:
        return _fail(str(exc))
    print(key, flush=True)  # the first line of stdout, and the only time it is shown
    try:
        print(json.dumps(record.as_json()), flush=True)
    except BrokenPipeError:  # `| head -1`: the reader took the key and left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    print(
        f"sserelay: created {record.id} for {record.subject!r} on plan {record.plan!r}, "
        f"expires {_when(record.expires_at) if record.expires_at else 'never'}; "
        "store the key now: it is not shown again",
        file=sys.stderr,
    )
    return 0


async def _list(args: argparse.Namespace, keys: ApiKeys) -> int:
    records = await keys.list()
    if args.json:
        print(json.dumps([r.as_json() for r in records], indent=2))
        return 0
    rows = [("ID", "SUB", "PLAN", "NAME", "CREATED", "LAST USED", "EXPIRES")]
    now = time.time()

    def expires(r: ApiKeyRecord) -> str:
        text = _when(r.expires_at) if r.expires_at is not None else "never"
        return text + (" (expired)" if r.expired(now) else "")

    rows += [
        (
            r.id,
            r.subject,
            r.plan,
            r.name or "-",
            _when(r.created_at),
            _when(r.last_used_at),
            expires(r),
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


async def _revoke(args: argparse.Namespace, keys: ApiKeys) -> int:
    record = await keys.revoke(args.key_or_id)
    if record is None:
        return _fail("no such API key (or it was revoked already)", code=1)
    print(f"revoked {record.id} ({record.subject!r}, plan {record.plan!r})")
    return 0


async def _run(
    args: argparse.Namespace, action: Callable[[argparse.Namespace, ApiKeys], Awaitable[int]]
) -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        return _fail(f"invalid setting: {exc.errors()[0]['msg']}")
    if not settings.redis_url:
        print(NO_REDIS, file=sys.stderr)
        return 2
    try:
        config = load_config(settings.config)
    except ConfigError as exc:
        return _fail(str(exc))
    if action is _create and args.plan not in config.plans:
        return _fail(f"no plan named {args.plan!r} (plans: {', '.join(config.plans)})")
    client, tail, _ = redis_clients(settings.redis_url, max_connections=2)
    keys = ApiKeys(
        RedisApiKeyStore(client, prefix=settings.redis_prefix), plans=lambda: config.plans.keys()
    )
    try:
        return await action(args, keys)
    except ApiKeyStoreUnavailable as exc:
        return _fail(f"cannot reach Redis at SSERELAY_REDIS_URL: {exc}", code=1)
    finally:
        await client.aclose()
        await tail.aclose()


def create(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args, _create))


def list_keys(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args, _list))


def revoke(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args, _revoke))


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    apikeys = commands.add_parser("apikeys", help="API keys for server-side callers (Redis)")
    sub = apikeys.add_subparsers(dest="apikeys_command", required=True)
    do_create = sub.add_parser("create", help="make a key; prints it once, on the first line")
    do_create.add_argument("--sub", required=True, help="the subject the key acts as")
    do_create.add_argument("--plan", required=True, help="the plan it is charged against")
    do_create.add_argument("--name", default="", help="a label for lists (e.g. billing-job)")
    do_create.add_argument(
        "--expires", type=duration, default=None, help="e.g. 90d (default: never)"
    )
    do_create.set_defaults(handler=create)
    do_list = sub.add_parser("list", help="every key: id, subject, plan, times (never keys)")
    do_list.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    do_list.set_defaults(handler=list_keys)
    do_revoke = sub.add_parser("revoke", help="revoke a key, by the key or its id")
    do_revoke.add_argument("key_or_id", metavar="KEY_OR_ID")
    do_revoke.set_defaults(handler=revoke)
