"""``kvship keygen``: a pre-shared key for peer authentication, as an auth_key_file."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from typing import Any

from ..protocol.auth import KEY_ID
from .common import CliError

SECRET_BYTES = 32


def add_keygen_parser(sub: Any) -> None:
    p = sub.add_parser(
        "keygen",
        help="make a pre-shared key for peer authentication (an auth_key_file)",
        description="Print (or write, mode 0600) a TOML key file with one new random key. "
        "Give the same file to every daemon that must trust the others (one key per "
        "cluster), or merge [keys] tables for a key per peer (docs/security.md).",
    )
    p.add_argument("--id", default="cluster", help="the key's id (default: cluster)")
    p.add_argument("--out", help="write here (mode 0600; never overwrites) instead of stdout")
    p.set_defaults(func=cmd_keygen)


def key_file_text(key_id: str, secret: bytes) -> str:
    head = "# kvship pre-shared keys (docs/security.md); keep mode 0600\n[keys]\n"
    return f'{head}{key_id} = "{secret.hex()}"\n'


def cmd_keygen(args: argparse.Namespace) -> int:
    if not KEY_ID.fullmatch(args.id):
        raise CliError(f"--id {args.id!r}: 1-64 of A-Z a-z 0-9 . _ -")
    text = key_file_text(args.id, secrets.token_bytes(SECRET_BYTES))
    if not args.out:
        sys.stdout.write(text)
        return 0
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CliError(f"{args.out} exists: kvship keygen never overwrites a key") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    print(f"wrote key {args.id!r} to {args.out} (mode 0600)", file=sys.stderr)
    return 0
