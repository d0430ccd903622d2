"""The ``submerge`` command (console script ``submerge = "service.cli:main"``).

``merge``, ``validate`` and ``methods`` come from the library (``merging.cli``); ``merge`` runs the
whole job program (``workers.pipeline``: calibration capture, α search, evaluation). This module
adds ``calibrate`` (ESM calibration statistics, captured by ``evaluation.capture``) and the service
commands, ``serve`` (the REST API under uvicorn) and ``worker`` (the job queue worker); those two
load the web and queue stacks only when run. Dependencies point one way: service → workers →
evaluation → merging (the import contract in pyproject.toml).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import workers
from evaluation.capture import calibration_summary, capture_gram, save_calibration
from evaluation.data import load_rows, read_texts
from evaluation.models import load_model, local_model_dir
from merging import __version__
from merging.cli import (EXIT_ERROR, EXIT_OK, OneLineParser, UsageError, add_subcommands, debug_enabled, dispatch,
                         report_error, run_guarded)
from service.logs import logging_config
from workers.pipeline import run_pipeline


def _import_failed(what: str, exc: BaseException) -> int:
    if debug_enabled():
        traceback.print_exception(exc, file=sys.stderr)
    return report_error("unavailable", f"{what} is not available: {type(exc).__name__}: {exc}", EXIT_ERROR)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        # lazy: uvicorn and the app (FastAPI, SQLAlchemy, Celery, the routes) load only for `serve`, so the
        # library commands neither pay for nor depend on the web stack
        import uvicorn

        from service.app import create_app
    except Exception as e:  # noqa: BLE001 - ImportError, or an error raised while importing the app
        return _import_failed("the REST API (service.app:create_app)", e)
    # One log format for uvicorn's and our loggers on stderr; uvicorn's own access log is off because
    # the app's AccessLog middleware writes a redacted line per request (service/logs.py).
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level=args.log_level,
                log_config=logging_config(args.log_level), access_log=False)
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    return int(workers.main(list(args.worker_args)) or EXIT_OK)


def _run_pipeline(spec, progress=None):
    return run_pipeline(spec, progress=progress)


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {value}")
        return value
    return parse


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    """``submerge calibrate --model URI --data URI --samples 32 -o stats.safetensors``: run the model
    on the first ``--samples`` texts of the data file and write the Gram matrix of every linear
    layer's inputs (``<key>:gram``, ``<key>:count``), the file that a merge spec's
    ``experts[i].calibration.uri`` points to. Same contract as the other subcommands
    (``merging.cli``): one summary line on stdout; any failure is one ``submerge: error: <code>:
    <message>`` line on stderr with exit status 2 (usage) or 1."""
    p = subparsers.add_parser(
        "calibrate", help="capture ESM calibration statistics (layer-input Gram matrices) of a model",
        description="Run a model on the first --samples texts of a data file and write the Gram matrix XᵀX of "
                    "every linear layer's inputs (padding excluded) with the token count, as safetensors: "
                    "the file experts[i].calibration.uri of an ESM merge points to.")
    p.add_argument("--model", required=True, metavar="URI",
                   help="model directory or checkpoint URI (path, file://, s3://, http(s)://, hf://) with config.json")
    p.add_argument("--data", required=True, metavar="URI", help="task data: .jsonl, .json, .csv or .parquet (.gz allowed)")
    p.add_argument("--samples", type=_positive("--samples"), default=32, metavar="N",
                   help="number of texts: the first N rows (default: %(default)s)")
    p.add_argument("--text-field", default="text", metavar="NAME", help="field holding the text (default: %(default)s)")
    p.add_argument("--max-length", type=_positive("--max-length"), default=128, metavar="N",
                   help="tokens per text, truncated beyond (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=8, metavar="N", help="texts per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: %(default)s")
    p.add_argument("--tokenizer", metavar="URI", help="tokenizer directory or URI, when the model has none (e.g. the base model's)")
    p.add_argument("--adapter", default="hf_transformers", metavar="NAME",
                   help="model adapter: hf_transformers (default) or python:package.module:function")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="output .safetensors file (path, file:// or s3://)")
    p.set_defaults(func=cmd_calibrate)
    return p


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.max_length < 2:
        raise UsageError("--max-length must be at least 2")
    t0 = time.perf_counter()
    rows = load_rows(args.data, limit=args.samples)
    texts = read_texts(rows, args.text_field, uri=args.data)
    model_dir = local_model_dir(args.model)
    tokenizer_dir = local_model_dir(args.tokenizer) if args.tokenizer else None
    model = load_model(model_dir, adapter=args.adapter, device=args.device, tokenizer_dir=tokenizer_dir)
    stats = capture_gram(model, texts, batch_size=args.batch_size, max_length=args.max_length)
    save_calibration(stats, args.output)
    layers, tokens = calibration_summary(stats)
    print(f"calibrated {layers} layers on {tokens} tokens from {len(texts)} texts -> {args.output} "
          f"({time.perf_counter() - t0:.1f}s)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="submerge", description="submerge: merge fine-tuned checkpoints of one base model, "
                                                        "from the command line or as a service.")
    parser.add_argument("--version", action="version", version=f"submerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_subcommands(sub)
    # `submerge merge` runs the whole job pipeline: calibration capture from samples, α search
    # ("alpha": "auto") and evaluation, not only the library's merge().
    sub.choices["merge"].set_defaults(runner=_run_pipeline)

    p = sub.add_parser("serve", help="run the REST API (uvicorn)", description="Run the REST API under uvicorn.")
    p.add_argument("--host", default=os.environ.get("SUBMERGE_HOST", "127.0.0.1"), help="bind address (default: %(default)s)")
    p.add_argument("--port", type=int, default=int(os.environ.get("SUBMERGE_PORT", "8000")), help="port (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn log level (default: %(default)s)")
    p.set_defaults(func=cmd_serve)

    # Listed for --help; main() hands everything after "worker" to the worker untouched.
    p = sub.add_parser("worker", help="run a job-queue worker (arguments after 'worker' go to it)",
                       description="Run a job-queue worker; arguments after 'worker' are passed on to it.")
    p.set_defaults(func=cmd_worker, worker_args=[])

    add_calibrate_parser(sub)  # ESM calibration statistics
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:  # argparse cannot pass option-like arguments through a subcommand
        return run_guarded(lambda: cmd_worker(argparse.Namespace(worker_args=argv[1:])))
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
