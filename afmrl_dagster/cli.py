"""The ``afmrl`` command."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="afmrl", description="AFMRL retrieval pipeline")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="materialise the whole asset graph on the configured catalog and print the results")
    demo.add_argument("--write-readme", metavar="PATH", help="also write the results into PATH between the demo-results markers")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(write_readme=args.write_readme)


if __name__ == "__main__":
    main()
