"""`sserelay records export --since ... > records.jsonl`: request records, with feedback,
from the shared Redis store (records in memory live and die with one server process)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from datetime import datetime

import redis.asyncio as aioredis

from .records import RedisRecordStore
from .settings import Settings


def moment(text: str) -> float:
    """An ISO 8601 time (`2026-11-24T09:00:00Z`) or an age (`90m`, `24h`, `7d`)."""
    match = re.fullmatch(r"(\d+)([smhd])", text)
    if match:
        seconds = int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return time.time() - seconds
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a time or an age: {text!r}") from exc


async def _export(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.redis_url:
        print(
            "sserelay: records export needs SSERELAY_REDIS_URL (the shared record store)",
            file=sys.stderr,
        )
        return 2
    client = aioredis.Redis.from_url(settings.redis_url)
    store = RedisRecordStore(
        client,
        prefix=settings.redis_prefix,
        max_records=settings.records_max,
        ttl_s=settings.records_ttl_s,
    )
    count = 0
    try:
        async for record in store.export(args.since, args.until):
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    finally:
        await client.aclose()
    print(f"sserelay: exported {count} records", file=sys.stderr)
    return 0


def export(args: argparse.Namespace) -> int:
    return asyncio.run(_export(args, Settings()))


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    records = commands.add_parser("records", help="request records")
    sub = records.add_subparsers(dest="records_command", required=True)
    do_export = sub.add_parser("export", help="print records as JSON lines")
    do_export.add_argument("--since", type=moment, required=True, help="ISO time or age (24h, 7d)")
    do_export.add_argument("--until", type=moment, default=None)
    do_export.set_defaults(handler=export)
