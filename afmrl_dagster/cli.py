"""The ``afmrl`` command."""

from __future__ import annotations

import argparse


def _add_evaluate(commands) -> argparse.ArgumentParser:
    evaluate = commands.add_parser(
        "evaluate",
        help="score an encoder on a catalog under its dataset's protocol; write metrics as JSON (and markdown)",
        description="Score an encoder on a catalog: grocery (--split val.txt: its photos query every other listing, "
        "and the catalog images alone), wdc_products (--split <pair file>: its offers query each other), "
        "amazon_google (matched records query the other table), anything else (every listing queries all others).",
    )
    evaluate.add_argument("--catalog", required=True, metavar="SPEC",
                          help="catalog source: builtin[:...], grocery:PATH, wdc_products:PATH, amazon_google:PATH, abo:PATH, parquet:LOCATION")
    evaluate.add_argument("--split", metavar="PATH", help="split list (grocery) or pair file(s), comma-separated (wdc_products)")
    evaluate.add_argument("--encoder", default="zero-shot", metavar="ENCODER",
                          help="'zero-shot', a head folder (head.safetensors + config.json) or an MLflow model URI "
                          "such as models:/afmrl-encoder@champion (default: zero-shot)")
    evaluate.add_argument("--out", required=True, metavar="PATH", help="where to write the metrics JSON")
    evaluate.add_argument("--markdown", metavar="PATH", help="also write the metrics as a markdown table")
    evaluate.add_argument("--limit", type=int, metavar="N", help="score only the first N queries by listing id")
    return evaluate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="afmrl", description="AFMRL retrieval pipeline")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="materialise the whole asset graph on the configured catalog and print the results")
    demo.add_argument("--write-readme", metavar="PATH", help="also write the results into PATH between the demo-results markers")
    evaluate = _add_evaluate(commands)
    serve_teacher = commands.add_parser(
        "serve-teacher", help="serve one of the project's models behind an OpenAI-compatible chat-completions endpoint",
        description="An OpenAI-compatible /v1/chat/completions server for the HTTP teacher: the rule-based "
        "title-facts reader, or a Hugging Face causal LM (hf:<id or folder>).",
    )
    from .teacher_server import add_arguments

    add_arguments(serve_teacher)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(write_readme=args.write_readme)
    elif args.command == "evaluate":
        from .evaluate_command import EvaluationError, run_evaluate

        try:
            run_evaluate(args.catalog, args.encoder, args.out, split=args.split, markdown=args.markdown, limit=args.limit)
        except EvaluationError as error:
            evaluate.exit(2, f"afmrl evaluate: error: {error}\n")
    elif args.command == "serve-teacher":
        from .teacher_server import serve

        try:
            serve(args)
        except (ValueError, OSError) as error:
            serve_teacher.exit(2, f"afmrl serve-teacher: error: {error}\n")


if __name__ == "__main__":
    main()
