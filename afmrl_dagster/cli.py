"""The ``afmrl`` command."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="afmrl", description="AFMRL retrieval pipeline")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="materialise the whole asset graph on the configured catalog and print the results")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo()


if __name__ == "__main__":
    main()
