"""The command line of signing keys: make a key pair, say what a key file is, rotate keys.

    python -m runtime.keys new NAME          NAME.key (the learner's, mode 0600), NAME.pub
    python -m runtime.keys id FILE [FILE ...]   each file's kind and key id
    python -m runtime.keys rotate OLD NEW    the pair NEW.key/NEW.pub, and the steps that move
                                             learner and devices from OLD to NEW

The learner signs with NAME.key (export.key_file, runtime.daemon.rollback --key); devices
trust NAME.pub (runtime.infer --follow SOURCE --key NAME.pub). This module is the front end
only: the domain is runtime.device.keys, whose KeyFileError is one line
``keys: error: ...`` and exit 2. Torch-free: it runs on the learner and on a device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.cli import OneLineParser, UsageError
from runtime.device.keys import (
    KIND_NAMES,
    PRIVATE,
    PUBLIC,
    SECRET,
    KeyFileError,
    identify,
    key_pair_paths,
    new_key_pair,
)

HOLDER = {PRIVATE: "the learner's: export.key_file", PUBLIC: "a device's: --key"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m runtime.keys",
                           description="Ed25519 keys that sign published policies: the "
                                       "learner holds NAME.key, devices NAME.pub.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=OneLineParser)
    new = commands.add_parser("new", help="make NAME.key (private, mode 0600) and NAME.pub")
    new.add_argument("name", metavar="NAME", help="path and name of the pair, e.g. fleet")
    ident = commands.add_parser("id", help="print each key file's kind and key id")
    ident.add_argument("files", metavar="FILE", nargs="+")
    rotate = commands.add_parser("rotate", help="make the pair NEW and print the steps "
                                                "from OLD to NEW")
    rotate.add_argument("old", metavar="OLD", help="the name of the pair in use")
    rotate.add_argument("new", metavar="NEW", help="the name of the new pair")
    return parser.parse_args(argv)


def describe(path: str | Path) -> str:
    kind, key_id = identify(path)
    if key_id is None:
        return f"{path}: {KIND_NAMES[kind]} (its signatures name no key id)"
    return f"{path}: {KIND_NAMES[kind]}, key id {key_id} ({HOLDER[kind]})"


def make(name: str) -> list[str]:
    private, public, key_id = new_key_pair(name)
    return [f"private key: {private} (mode 600; the learner's: export.key_file)",
            f"public key:  {public} (the devices': --key {public})",
            f"key id:      {key_id}"]


def rotation(old: str, new: str) -> list[str]:
    """Make the pair NEW; the lines that say how learner and devices move to it from OLD
    (an Ed25519 pair, or a shared HMAC secret file)."""
    old_private, old_public = key_pair_paths(old)
    in_use = old_public if old_public.exists() else old_private
    if not in_use.exists():
        raise KeyFileError(f"neither {old_public} nor {old_private} exists: OLD names the "
                           f"key pair in use (made by: python -m runtime.keys new {old})")
    kind, old_id = identify(in_use)
    trusted_now, was = (old_private, f"the shared secret {old_private}") if kind == SECRET \
        else (old_public, f"key id {old_id}")
    private, public, new_id = new_key_pair(new)
    where = "everywhere" if kind == SECRET else "on the learner"
    return [
        f"made {private} (mode 600) and {public}: key id {new_id} (in use: {was})",
        f"1. On every device, trust both: copy {public} there, restart its player with",
        f"     python -m runtime.infer --follow SOURCE --key {trusted_now} --key {public}",
        "2. On the learner, sign with the new key: stop the daemon, start it again with",
        f"     python -m runtime.daemon --config CONFIG --set export.key_file={private}",
        f"   (or export.key_file: {private} in CONFIG; rollbacks: --key {private})",
        f"3. Once every device plays a policy signed by the new key (its log says "
        f"'signed by key {new_id}'),",
        "   restart its player with",
        f"     python -m runtime.infer --follow SOURCE --key {public}",
        f"   and delete {old_private} {where}.",
    ]


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.command == "new":
            lines = make(args.name)
        elif args.command == "id":
            lines = [describe(path) for path in args.files]
        else:
            lines = rotation(args.old, args.new)
    except (UsageError, KeyFileError) as exc:
        print(f"keys: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
