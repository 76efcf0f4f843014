"""`sserelay token issue` and `sserelay keys generate`: the built-in issuer from a shell."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import secrets
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .authn import AuthConfigError, build_auth
from .config import load_config
from .redis_client import redis_clients
from .settings import Settings

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """`90`, `90s`, `15m`, `12h`, `30d`."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 15m, 12h, 30d)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


async def _issue(args: argparse.Namespace, settings: Settings) -> int:
    config = load_config(settings.config)
    if args.plan not in config.plans:
        print(
            f"sserelay: no plan named {args.plan!r} (plans: {', '.join(config.plans)})",
            file=sys.stderr,
        )
        return 2
    client = tail = None
    if args.refresh:
        if not settings.redis_url:
            print(
                "sserelay: --refresh needs SSERELAY_REDIS_URL: refresh tokens are stored "
                "server-side, and a token stored in this command's memory would die with it",
                file=sys.stderr,
            )
            return 2
        client, tail, _ = redis_clients(settings.redis_url, max_connections=2)
    auth = build_auth(
        settings,
        plans=lambda: config.plans.keys(),
        default_plan=lambda: config.default_plan,
        redis=client,
    )
    try:
        if auth.issuer is None or auth.refresh is None or settings.development:
            print(
                "sserelay: no signing key: set SSERELAY_JWT_SECRET or "
                "SSERELAY_JWT_PRIVATE_KEY_FILE",
                file=sys.stderr,
            )
            return 2
        if args.refresh:
            auth.refresh.access_ttl_s = args.ttl
            pair = await auth.refresh.issue(args.sub, args.plan, args.scope)
            print(json.dumps(pair.as_json(), indent=2))
        else:
            token, _ = auth.issuer.issue(args.sub, args.plan, ttl_s=args.ttl, scopes=args.scope)
            print(token)
        return 0
    finally:
        await auth.aclose()
        for c in (client, tail):
            if c is not None:
                await c.aclose()


def issue(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_issue(args, Settings()))
    except AuthConfigError as exc:
        print(f"sserelay: {exc}", file=sys.stderr)
        return 2


def generate(args: argparse.Namespace) -> int:
    kid = args.kid or secrets.token_hex(4)
    if args.alg.startswith("HS"):
        secret = base64.urlsafe_b64encode(secrets.token_bytes(48)).decode().rstrip("=")
        print(f"# shared secret: SSERELAY_JWT_SECRET (and SSERELAY_JWT_ALGORITHM={args.alg})")
        print(secret)
        return 0
    private_key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if args.alg == "EdDSA":
        private_key = ed25519.Ed25519PrivateKey.generate()
    elif args.alg == "ES256":
        private_key = ec.generate_private_key(ec.SECP256R1())
    else:
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    spec = {"kid": kid, "alg": args.alg, "public_key": public_pem}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{kid}.key.pem").write_text(private_pem)
        (out / f"{kid}.key.pem").chmod(0o600)
        (out / f"{kid}.pub.pem").write_text(public_pem)
        print(f"SSERELAY_JWT_PRIVATE_KEY_FILE={out / f'{kid}.key.pem'}")
        print(f"SSERELAY_JWT_SIGNING_ALG={args.alg}")
        print(f"SSERELAY_JWT_SIGNING_KID={kid}")
        print(f"SSERELAY_JWT_KEYS='{json.dumps([spec])}'")
        return 0
    print(
        f"# private key (signing): a file for SSERELAY_JWT_PRIVATE_KEY_FILE, with "
        f"SSERELAY_JWT_SIGNING_ALG={args.alg} SSERELAY_JWT_SIGNING_KID={kid}"
    )
    print(private_pem, end="")
    print("# public key (verifying), as an SSERELAY_JWT_KEYS entry:")
    print(json.dumps([spec]))
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser("token", help="issue tokens with the configured key")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    do_issue = token_commands.add_parser("issue", help="print an access token")
    do_issue.add_argument("--sub", required=True)
    do_issue.add_argument("--plan", required=True)
    do_issue.add_argument("--ttl", type=duration, default=900.0, help="e.g. 15m (default)")
    do_issue.add_argument("--scope", action="append", default=[], help="repeatable")
    do_issue.add_argument(
        "--refresh", action="store_true", help="also a refresh token (stored in SSERELAY_REDIS_URL)"
    )
    do_issue.set_defaults(handler=issue)
    keys = commands.add_parser("keys", help="key material")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    do_generate = key_commands.add_parser("generate", help="print a new key pair")
    do_generate.add_argument(
        "--alg",
        default="EdDSA",
        choices=["EdDSA", "ES256", "RS256", "PS256", "HS256", "HS384", "HS512"],
    )
    do_generate.add_argument("--kid", help="key id (default: random)")
    do_generate.add_argument("--out", help="write <kid>.key.pem / <kid>.pub.pem here")
    do_generate.set_defaults(handler=generate)
