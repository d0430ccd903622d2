"""The ``submerge`` command (console script ``submerge = "service.cli:main"``).

``merge``, ``validate`` and ``methods`` come from the library (``merging.cli``) and ``calibrate``
from ``evaluation.cli``; this module adds the service commands, ``serve`` (the REST API under
uvicorn) and ``worker`` (the job queue worker). All of them import their heavy modules only
when run, so the library commands work without them. Dependencies point one way: service
imports merging, never the reverse.
"""
from __future__ import annotations

import argparse
import os
import sys

from merging.cli import (EXIT_ERROR, EXIT_OK, OneLineParser, add_subcommands, debug_enabled, dispatch, report_error,
                         run_guarded)


def _import_failed(what: str, exc: BaseException) -> int:
    if debug_enabled():
        import traceback
        traceback.print_exception(exc, file=sys.stderr)
    return report_error("unavailable", f"{what} is not available: {type(exc).__name__}: {exc}", EXIT_ERROR)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from service.app import create_app
        from service.logs import logging_config
    except Exception as e:  # noqa: BLE001 - ImportError, or an error raised while importing the app
        return _import_failed("the REST API (service.app:create_app)", e)
    # One log format for uvicorn's and our loggers on stderr; uvicorn's own access log is off because
    # the app's AccessLog middleware writes a redacted line per request (service/logs.py).
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level=args.log_level,
                log_config=logging_config(args.log_level), access_log=False)
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    try:
        import workers
    except Exception as e:  # noqa: BLE001
        return _import_failed("the worker (workers)", e)
    extra = list(args.worker_args)
    main = getattr(workers, "main", None)
    if callable(main):
        return int(main(extra) or EXIT_OK)
    app = getattr(workers, "celery_app", None) or getattr(workers, "app", None)
    if app is not None and hasattr(app, "worker_main"):
        app.worker_main(["worker", *extra])
        return EXIT_OK
    return report_error("unavailable", "the worker (workers) provides neither main(argv) nor a Celery app", EXIT_ERROR)


def _run_pipeline(spec, progress=None):
    from evaluation.pipeline import run_pipeline
    return run_pipeline(spec, progress=progress)


def build_parser() -> argparse.ArgumentParser:
    from merging import __version__

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

    # ESM calibration statistics; evaluation.cli imports torch/transformers only when it runs.
    from evaluation.cli import add_calibrate_parser
    add_calibrate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:  # argparse cannot pass option-like arguments through a subcommand
        return run_guarded(lambda: cmd_worker(argparse.Namespace(worker_args=argv[1:])))
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
