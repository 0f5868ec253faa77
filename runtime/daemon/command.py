"""The daemon's command line: arguments and config are read and checked before torch.

A wrong key or value is the most common bad input, and its one-line error should not wait
seconds for torch and the learner to import; `lifecycle` (which imports them) is loaded
only for a config that reads. Errors that need the stream or a checkpoint come later, from
`Daemon.prepare`, in the same one-line form.
"""

from __future__ import annotations

import argparse
import sys

from runtime.cli import OneLineParser, UsageError
from runtime.daemon.config import Config, ConfigError, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m runtime.daemon",
                           description="The main job: learn online from one stream.")
    parser.add_argument("--config", required=True, help="YAML config file (see config.yaml)")
    parser.add_argument("--run-dir", help="run directory (overrides run.dir)")
    parser.add_argument("--max-steps", type=int, help="stop at this all-time step count "
                        "(overrides run.max_steps)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted config key, e.g. --set env.id=CartPole-v1")
    parser.add_argument("--fresh", action="store_true",
                        help="start over; existing checkpoints are moved aside, not deleted")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.set)
    if args.run_dir is not None:
        overrides.append(f"run.dir={args.run_dir}")
    if args.max_steps is not None:
        overrides.append(f"run.max_steps={args.max_steps}")
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    """Exit codes as `lifecycle` documents them; 2 with one line for bad usage or config."""
    try:
        args = parse_args(argv)
        config = resolve_config(args)
    except (UsageError, ConfigError) as exc:
        print(f"daemon: error: {exc}", file=sys.stderr)
        return 2
    from runtime.daemon.lifecycle import run_daemon

    return run_daemon(config, fresh=args.fresh)
