"""``submerge calibrate``: capture an expert's ESM calibration statistics into a file.

    submerge calibrate --model URI --data URI --samples 32 -o stats.safetensors

runs the model on the first ``--samples`` texts of the data file and writes the Gram matrix of
every linear layer's inputs (``<key>:gram``, ``<key>:count``), the file that a merge spec's
``experts[i].calibration.uri`` points to. Same contract as the other subcommands
(``merging.cli``): one summary line on stdout; any failure is one ``submerge: error: <code>:
<message>`` line on stderr with exit status 2 (usage) or 1. This module imports only argparse
and ``merging.cli`` at import time; torch and transformers load when the command runs.
"""
from __future__ import annotations

import argparse
import sys
import time

from merging.cli import EXIT_OK, OneLineParser, UsageError, run_guarded


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
    """Mount ``calibrate`` on an argparse subparsers object."""
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
    from evaluation.capture import calibration_summary, capture_gram, save_calibration
    from evaluation.data import load_rows, read_texts
    from evaluation.models import load_model, local_model_dir

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


def main(argv: list[str] | None = None) -> int:
    """``python -m evaluation.cli calibrate ...`` (the same command without the service package)."""
    parser = OneLineParser(prog="submerge")
    add_calibrate_parser(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))

    def _run() -> int:
        args = parser.parse_args(argv)
        return args.func(args)
    return run_guarded(_run)


if __name__ == "__main__":
    sys.exit(main())
