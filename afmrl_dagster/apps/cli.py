"""The ``afmrl`` command."""

from __future__ import annotations

import argparse
import sys

from ..settings import DEFAULT_STORE, DEFAULT_TRACKING_URI, Settings


def _add_evaluate(commands) -> argparse.ArgumentParser:
    evaluate = commands.add_parser(
        "evaluate",
        help="score an encoder on a catalog under its dataset's protocol; write metrics as JSON (and markdown)",
        description="Score an encoder on a catalog: grocery (--split val.txt: its photos query every other listing, "
        "and the catalog images alone), wdc_products (--split <pair file>: its offers query each other; "
        "--split unseen:<training pair file>: 30% of its products held out, their offers query each other), "
        "amazon_google (matched records query the other table), anything else (every listing queries all others).",
    )
    evaluate.add_argument("--catalog", required=True, metavar="SPEC",
                          help="catalog source: builtin[:...], grocery:PATH, wdc_products:PATH, amazon_google:PATH, abo:PATH, parquet:LOCATION")
    evaluate.add_argument("--split", metavar="PATH", help="split list (grocery), pair file(s) comma-separated (wdc_products), or "
                          "unseen:PAIR_FILE[,...] (wdc_products: the products held out of those training offers)")
    evaluate.add_argument("--encoder", default="zero-shot", metavar="ENCODER",
                          help="'zero-shot', 'champion' (the encoder the pipeline's serving record names), a head folder "
                          "(head.safetensors + config.json) or an MLflow model URI such as models:/afmrl-encoder/3 (default: zero-shot)")
    evaluate.add_argument("--out", required=True, metavar="PATH", help="where to write the metrics JSON")
    evaluate.add_argument("--markdown", metavar="PATH", help="also write the metrics as a markdown table")
    evaluate.add_argument("--limit", type=int, metavar="N", help="score only the first N queries by listing id")
    evaluate.add_argument("--image-root", action="append", default=None, metavar="FOLDER_OR_S3",
                          help="a folder or s3://bucket/prefix the catalog's image_uri may point into, besides the catalog's "
                               "own folder (repeatable; default: AFMRL_IMAGE_ROOTS); other image URIs are refused unread")
    return evaluate


def _search(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from pathlib import Path

    from ..devices import resolve_device
    from .search import SearchEngine, SearchError, result_json, result_table
    from ..storage import StorageError, open_store, read_uri_bytes

    try:
        settings = Settings.from_env()
    except ValueError as error:
        parser.exit(2, f"afmrl search: error: {error}\n")
    try:  # a regular file under the image caps: never a device, a FIFO or a folder
        image = read_uri_bytes(str(Path(args.image).expanduser())) if args.image else None
    except (StorageError, ValueError) as error:
        parser.exit(2, f"afmrl search: error: --image: {error}\n")
    try:
        store = open_store(settings.store, endpoint_url=settings.s3_endpoint_url, region_name=settings.aws_region)
        engine = SearchEngine.from_store(store, device=resolve_device())
        result = engine.search(image=image, text=args.text, k=args.k)
    except (SearchError, StorageError, ValueError) as error:
        parser.exit(2, f"afmrl search: error: {error}\n")
    print(result_json(result) if args.json else result_table(result))


def _rollback(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ..promotion import RegistryError, RollbackError, bound_registry_retries, rollback_champion

    from ..registry import ENCODER_MODEL_NAME
    from ..serving import ServingError, publish_champion_record
    from ..storage import StorageError, open_store

    # Bounded, announced retries: a registry that does not answer is named within a minute,
    # not after MLflow's default backoff has waited minutes in silence.
    bound = bound_registry_retries()
    try:
        settings = Settings.from_env()
        tracking_uri = args.tracking_uri or settings.tracking_uri
        print(f"afmrl rollback: reading the aliases of {args.model} from {tracking_uri} ({bound})", file=sys.stderr, flush=True)
        client = MlflowClient(tracking_uri=tracking_uri)
        rolled_from, rolled_to = rollback_champion(client, args.model)
    except (RollbackError, RegistryError, MlflowException, ValueError) as error:
        parser.exit(2, f"afmrl rollback: error: {error}\n")
    print(f"{args.model}: champion moved from version {rolled_from} back to version {rolled_to} "
          f"(version {rolled_from} is now previous_champion; run again to undo)")
    if args.model == ENCODER_MODEL_NAME:  # search serves what the record names: it follows the champion
        try:
            store = open_store(settings.store, endpoint_url=settings.s3_endpoint_url, region_name=settings.aws_region)
            record, uri = publish_champion_record(client, store, args.model)
        except (ServingError, StorageError, RegistryError, MlflowException, ValueError) as error:
            parser.exit(2, f"afmrl rollback: error: the champion moved, but the serving record was not rewritten: {error}\n")
        print(f"serving record {uri}: version {record.encoder_version} with index {record.index_uri}")


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
    search = commands.add_parser(
        "search", help="find the listings of a photo and/or a text with the champion encoder and the pipeline's index",
        description="Query -> generated attributes -> encoder -> index -> top-k listings, with what the serving record "
        f"of the artefact store (AFMRL_STORE, default {DEFAULT_STORE}) names: the champion encoder, its index and its generator.",
    )
    search.add_argument("--image", metavar="PATH", help="photo of the product (local path)")
    search.add_argument("--text", metavar="TEXT", help="title or description typed by the user")
    search.add_argument("--k", type=int, default=10, help="listings to return (default 10)")
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rollback = commands.add_parser(
        "rollback", help="move a registered model's champion alias back to the version it replaced",
        description="Undo the last promotion of a registered model: 'champion' moves back to the 'previous_champion' "
        "version, which in turn becomes the rolled-back version (so a second rollback undoes the first). "
        f"Reads MLflow from --tracking-uri or MLFLOW_TRACKING_URI (default {DEFAULT_TRACKING_URI}).",
    )
    rollback.add_argument("--model", default="afmrl-encoder", help="registered model name (default afmrl-encoder; "
                          "or afmrl-attribute-generator)")
    rollback.add_argument("--tracking-uri", help="MLflow tracking server or store (default: MLFLOW_TRACKING_URI)")
    args = parser.parse_args(argv)
    if args.command == "rollback":
        _rollback(args, rollback)
    elif args.command == "demo":
        from .demo import run_demo

        run_demo(write_readme=args.write_readme)
    elif args.command == "evaluate":
        from .evaluate import run_evaluate
        from ..evaluation.protocols import EvaluationError

        try:
            from ..settings import Settings

            image_roots = args.image_root if args.image_root is not None else list(Settings.from_env().image_roots)
            run_evaluate(args.catalog, args.encoder, args.out, split=args.split, markdown=args.markdown, limit=args.limit,
                         image_roots=image_roots)
        except EvaluationError as error:
            evaluate.exit(2, f"afmrl evaluate: error: {error}\n")
    elif args.command == "search":
        _search(args, search)
    elif args.command == "serve-teacher":
        from .teacher_server import serve

        try:
            serve(args)
        except (ValueError, OSError) as error:
            serve_teacher.exit(2, f"afmrl serve-teacher: error: {error}\n")


if __name__ == "__main__":
    main()
