"""``bigopt config <conf> [k=v ...]``: print the fully resolved configuration (what gets logged)."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--hash", action="store_true", help="print only the config hash")


def run(cfg, args) -> int:
    from jobs.config import config_hash, dump_config

    print(config_hash(cfg) if args.hash else dump_config(cfg), end="" if not args.hash else "\n")
    return 0


if __name__ == "__main__":
    from jobs.cli import submit_main

    submit_main("config")
