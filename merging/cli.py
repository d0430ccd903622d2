"""The library's command line: ``submerge merge | validate | methods``.

Pure library: argparse, torch and the merging package only, no web or queue imports. The
top-level ``submerge`` entry point (``service.cli:main``) mounts these subcommands next to
``serve`` and ``worker``; ``python -m merging.cli`` runs them without the service package.

Contract for scripts:

* stdout carries the result (a summary, or JSON with ``--json``); stderr carries progress.
* Any failure prints exactly one line to stderr, ``submerge: error: <code>: <message>``,
  and exits 2 for spec/usage errors, 1 for any other error, 130 on Ctrl-C. Set
  ``SUBMERGE_DEBUG=1`` to get the traceback as well.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections import Counter
from typing import Any, Callable, TextIO

from tqdm import tqdm

from merging import __version__, engine
from merging.errors import MergeError, SpecError
from merging.io.writer import Publisher
from merging.methods import describe_methods
from merging.memory import format_bytes
from merging.plan import preflight
from merging.progress import ProgressEvent
from merging.spec import load_spec, load_spec_file

PROG = "submerge"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command line (reported like a spec error: one line, exit 2)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one ``submerge: error: usage: ...`` line (exit 2)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ----------------------------------------------------------------------------------------
# errors


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def report_error(code: str, message: str, status: int, stream: TextIO | None = None) -> int:
    stream = stream or sys.stderr
    print(f"{PROG}: error: {code}: {_one_line(message)}", file=stream, flush=True)
    return status


def debug_enabled() -> bool:
    return os.environ.get("SUBMERGE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def run_guarded(fn: Callable[[], int | None]) -> int:
    """Run a command; map every failure to one stderr line and an exit status."""
    try:
        return fn() or EXIT_OK
    except KeyboardInterrupt:
        return report_error("interrupted", "interrupted by user; nothing was published", EXIT_INTERRUPTED)
    except UsageError as e:
        return report_error("usage", str(e), EXIT_USAGE)
    except SpecError as e:
        _maybe_traceback()
        return report_error(e.code, str(e), EXIT_USAGE)
    except MergeError as e:
        _maybe_traceback()
        return report_error(e.code, str(e), EXIT_ERROR)
    except BrokenPipeError:  # e.g. `submerge methods | head`
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        _maybe_traceback()
        msg = str(e)
        return report_error("internal_error", f"{type(e).__name__}: {msg}" if msg else type(e).__name__, EXIT_ERROR)


def _maybe_traceback() -> None:
    if debug_enabled():
        traceback.print_exc(file=sys.stderr)


# ----------------------------------------------------------------------------------------
# formatting helpers


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


# ----------------------------------------------------------------------------------------
# progress


class _TerminalBar(tqdm):
    """One progress line redrawn in place, drawn by tqdm: phase, bar, done/total, percent, time
    since the merge started, ETA of the phase (tqdm's, from the phase's mean rate), and the
    current tensor key or message. The reporter sets the counts and decides when to redraw, on
    its own clock; tqdm neither times nor redraws anything by itself."""

    monitor_interval = 0  # no monitor thread redrawing from elsewhere
    BAR_FORMAT = "{desc} {bar:20} {n_fmt}/{total_fmt} {percentage:3.0f}% elapsed {run_elapsed} eta {remaining}{detail}"

    def __init__(self, stream: TextIO, width: int | None, clock: Callable[[], float], run_start: float):
        self.clock, self.run_start, self.detail = clock, run_start, ""
        # ``width``: at most width - 1 columns, so the terminal never wraps the line; else its width.
        # delay: nothing drawn on creation (the first ``show`` draws), and none afterwards, so that
        # close() ends or erases the line.
        super().__init__(file=stream, total=0, bar_format=self.BAR_FORMAT, position=0, leave=True, delay=1,
                         ncols=max(width - 1, 10) if width else None, dynamic_ncols=not width)
        self.delay = 0
        self._time = clock  # tqdm's elapsed time (the phase's, see ``show``) on the reporter's clock
        self.start_t = self.last_print_t = clock()

    @property
    def format_dict(self) -> dict[str, Any]:
        return {**super().format_dict, "run_elapsed": self.format_interval(self.clock() - self.run_start),
                "detail": self.detail}

    def show(self, event: Any, now: float, new_phase: bool) -> None:
        total = max(int(event.total), 0)
        self.desc, self.total = event.phase, total
        self.n = min(max(int(event.done), 0), total) if total else 0
        self.detail = f" {event.key}" if event.key else (f" {event.message}" if event.message else "")
        if new_phase:
            self.start_t = now
        self.last_print_t = now
        self.refresh()


class ProgressReporter:
    """Progress callback for ``merging.merge`` that draws on ``stream`` (stderr).

    TTY: one line redrawn in place by tqdm (``_TerminalBar``), at most every ``min_interval``
    seconds. Not a TTY (logs, CI): one line when a phase starts and one per 10 % of the phase.
    The ``inspect`` phase is reported when it finishes, so that a bad input fails with the
    error line alone.
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None, min_interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic, width: int | None = None):
        self.stream = stream or sys.stderr
        if tty is None:
            try:
                tty = self.stream.isatty()
            except (AttributeError, ValueError):
                tty = False
        self.tty = tty
        self.min_interval = min_interval
        self.clock = clock
        self.width = width
        self.start = clock()
        self.phase: str | None = None
        self.phase_start = self.start
        self.last_decile = -1
        self.last_draw = float("-inf")
        self.bar: _TerminalBar | None = None  # a TTY line is on screen
        self.finished = False

    # the merge callback
    def __call__(self, event: ProgressEvent) -> None:
        now = self.clock()
        new_phase = event.phase != self.phase
        if new_phase:
            self.phase, self.phase_start, self.last_decile = event.phase, now, -1
        if event.phase == "done":
            self.finished = True
        if self.tty:
            if new_phase or event.phase == "done" or now - self.last_draw >= self.min_interval:
                if self.bar is None:
                    self.bar = _TerminalBar(self.stream, self.width, self.clock, self.start)
                self.bar.show(event, now, new_phase)
                self.last_draw = now
        else:
            self._log(event, now, new_phase)

    def _fields(self, event: ProgressEvent, now: float) -> tuple[str, str]:
        total = max(int(event.total), 0)
        done = min(max(int(event.done), 0), total) if total else 0
        frac = done / total if total else 1.0
        phase_elapsed = now - self.phase_start
        eta = phase_elapsed * (total - done) / done if done and total else None
        if event.phase == "done":
            eta = 0.0
        counts = f"{done}/{total} {100 * frac:3.0f}%"
        times = f"elapsed {format_duration(now - self.start)} eta {format_duration(eta)}"
        return counts, times

    def _log(self, event: ProgressEvent, now: float, new_phase: bool) -> None:
        total = int(event.total)
        decile = int(10 * event.done / total) if total else 10
        if new_phase:
            self.last_decile = decile
            if event.phase == "inspect" and event.done < total:
                return  # reported when it finishes
        elif total > 1 and decile > self.last_decile:
            self.last_decile = decile
        elif event.phase == "inspect" and total and event.done >= total:
            pass
        else:
            return
        counts, times = self._fields(event, now)
        line = f"{PROG}: {event.phase} {counts} {times}"
        if event.key:
            line += f" {event.key}"
        elif event.message:
            line += f" ({event.message})"
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """End the TTY line: keep it after a finished merge, erase it after a failure."""
        if self.bar is not None:
            self.bar.leave = self.finished
            self.bar.close()
            self.bar = None


# ----------------------------------------------------------------------------------------
# merge


def apply_overrides(spec, *, output: str | None = None, overwrite: bool = False, device: str | None = None,
                    workers: int | None = None):
    """The spec with command-line overrides applied (re-validated as a whole)."""
    if output is None and not overwrite and device is None and workers is None:
        return spec
    data = spec.model_dump(mode="json", by_alias=True)
    if output is not None:
        data["output"]["uri"] = output
    if overwrite:
        data["output"]["overwrite"] = True
    if device is not None:
        data.setdefault("options", {})["device"] = device
    if workers is not None:
        data.setdefault("options", {})["workers"] = workers
    return load_spec(data)


def merge_summary(result, wall_s: float) -> dict[str, Any]:
    """What a caller wants to know about a finished merge, derived from its manifest."""
    m = result.manifest
    return {
        "output_uri": result.output_uri,
        "method": m.get("method"),
        "params": m.get("params", {}),
        "device": m.get("device"),
        "compute_dtype": m.get("compute_dtype"),
        "tensors": m.get("coverage", {}),
        "files": {name: dict(info) for name, info in result.files.items()},
        "manifest": Publisher.MARKER,
        "notes": m.get("notes", {}),
        "timings_s": m.get("timings_s", {k: round(v, 3) for k, v in result.timings.items()}),
        "wall_s": round(wall_s, 3),
    }


def format_merge_summary(s: dict[str, Any]) -> str:
    cov = s["tensors"]
    lines = [
        f"merged {cov.get('total', 0)} tensors with {s['method']} into {s['output_uri']}",
        f"  output    {s['output_uri']}",
        f"  method    {s['method']} {json.dumps(s['params'], sort_keys=True)}",
        f"  device    {s['device']} ({s['compute_dtype']})",
        f"  tensors   {cov.get('total', 0)} total: {cov.get('merged', 0)} merged, {cov.get('copied', 0)} copied from the base",
        "  files",
    ]
    files = s["files"]
    w = max([len(n) for n in files] + [len(s["manifest"])])
    for name, info in files.items():
        lines.append(f"    {name:<{w}}  {format_bytes(info.get('size', 0)):>10}")
    lines.append(f"    {s['manifest']:<{w}}  {'(manifest)':>10}")
    total_size = sum(int(i.get("size", 0)) for i in files.values())
    lines.append(f"    {'total':<{w}}  {format_bytes(total_size):>10}")
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in s["timings_s"].items() if k != "total")
    lines.append(f"  time      {s['wall_s']:.2f}s wall" + (f" ({timings})" if timings else ""))
    ev = s.get("evaluation")
    if ev:
        if ev.get("chosen_lambda"):
            lams = ", ".join(f"{n} {v:g}" for n, v in ev["chosen_lambda"].items())
            lines.append(f"  lambda    {lams} (TALL masks, chosen on validation data)")
        if ev.get("chosen_alpha") is not None:
            lines.append(f"  alpha     {ev['chosen_alpha']:g} (chosen on validation data)")
        avg = ev.get("average") or {}
        lines.append("  accuracy  " + ", ".join(f"{k} {v:.4f}" for k, v in avg.items() if isinstance(v, (int, float))))
        for task, acc in (ev.get("tasks") or {}).items():
            lines.append(f"    {task:<{w}}  {acc:.4f}")
    return "\n".join(lines)


def cmd_merge(args: argparse.Namespace) -> int:
    spec = apply_overrides(load_spec_file(args.spec), output=args.output, overwrite=args.overwrite, device=args.device,
                           workers=args.workers)
    reporter = None if args.quiet else ProgressReporter(sys.stderr)
    # The `submerge` entry point runs the whole job pipeline (calibration capture, α search,
    # evaluation) through `runner`; the bare library CLI can only merge.
    runner = getattr(args, "runner", None) or engine.merge  # looked up when run: tests replace it
    t0 = time.perf_counter()
    try:
        out = runner(spec, progress=reporter)
    finally:
        if reporter is not None:
            reporter.close()
    result = getattr(out, "merge", out)
    summary = merge_summary(result, time.perf_counter() - t0)
    evaluation = getattr(out, "evaluation", None)
    if evaluation is not None:
        summary["evaluation"] = {"average": evaluation.get("average"),
                                 "tasks": {r["task"]: r["merged"] for r in evaluation.get("tasks", [])}}
        if "alpha_search" in evaluation:
            summary["evaluation"]["chosen_alpha"] = evaluation["alpha_search"]["chosen_alpha"]
        if "lambda_search" in evaluation:
            summary["evaluation"]["chosen_lambda"] = evaluation["lambda_search"]["chosen_lambda"]
        if args.json:
            summary["evaluation"] = evaluation  # the full report section
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_merge_summary(summary))
    return EXIT_OK


# ----------------------------------------------------------------------------------------
# validate


def plan_summary(spec, plan, base, experts, memory=None, cost=None) -> dict[str, Any]:
    merged = [p for p in plan if p.action == "merge"]
    copied = [p for p in plan if p.action == "copy"]
    out_bytes = 0
    for p in plan:
        n = 1
        for d in p.out_shape:
            n *= int(d)
        out_bytes += n * p.out_dtype.itemsize
    return {
        "method": spec.method,
        "params": spec.method_params().model_dump(mode="json", by_alias=True),
        "base": {"uri": spec.base.uri, "format": base.format, "files": len(base.data_files())},
        "experts": [{"name": n, "uri": r.uri, "format": c.format} for n, r, c in zip(spec.expert_names(), spec.experts, experts)],
        "output": {"uri": spec.output.uri, "dtype": spec.output.dtype, "shard_size": spec.output.shard_size,
                   "overwrite": spec.output.overwrite},
        "tensors": {"total": len(plan), "merged": len(merged), "copied": len(copied)},
        "roles": dict(Counter(p.role.role.value for p in plan).most_common()),
        "roles_merged": dict(Counter(p.role.role.value for p in merged).most_common()),
        "copied": [{"key": p.key, "reason": p.reason} for p in copied],
        "output_bytes": out_bytes,
        "memory": memory.report(plan) if memory is not None else None,
        "cost": cost,
        "warnings": [],
    }


def format_plan_summary(s: dict[str, Any]) -> str:
    t = s["tensors"]
    lines = [
        f"spec ok: {s['method']} {json.dumps(s['params'], sort_keys=True)}",
        f"  base      {s['base']['uri']} ({s['base']['format']}, {s['base']['files']} file(s))",
        f"  experts   {len(s['experts'])}: " + ", ".join(f"{e['name']}={e['uri']}" for e in s["experts"]),
        f"  output    {s['output']['uri']} (dtype {s['output']['dtype']}, ~{format_bytes(s['output_bytes'])})",
        f"  plan      {t['total']} tensors: {t['merged']} merged, {t['copied']} copied",
        "  roles     " + (", ".join(f"{r} {n}" for r, n in s["roles"].items()) or "-"),
    ]
    if s.get("memory"):
        m = s["memory"]
        lines.append(f"  memory    ~{format_bytes(m['estimated_peak_bytes'])} peak (budget {format_bytes(m['budget_bytes'])}, "
                     f"{m['workers']} worker(s); {len(m['row_blocked'])} tensor(s) in row blocks)")
    if s.get("cost"):
        c = s["cost"]
        if c.get("estimated_wall_s") is None:
            lines.append(f"  time      no estimate: {c.get('reason')}")
        else:
            parts = ", ".join(f"{k} {v:g}s" for k, v in c["parts_s"].items())
            lines.append(f"  time      ~{c['estimated_wall_s']:g}s estimated ({parts}; cost model of {c['model']['measured']})")
    for c in s["copied"][:10]:
        lines.append(f"  copy      {c['key']} ({c['reason']})")
    if len(s["copied"]) > 10:
        lines.append(f"  copy      ... and {len(s['copied']) - 10} more")
    for w in s["warnings"]:
        lines.append(f"  warning   {w}")
    return "\n".join(lines)


def cmd_validate(args: argparse.Namespace) -> int:
    spec = apply_overrides(load_spec_file(args.spec), output=args.output, overwrite=args.overwrite)
    pf = preflight(spec)  # the same checks merge() makes before reading a tensor
    summary = plan_summary(pf.spec, pf.plan, pf.base, pf.experts, pf.memory, pf.cost)
    if pf.output_problem:
        summary["warnings"].append(f"{pf.output_problem}: merge will fail unless run with --overwrite")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_plan_summary(summary))
    return EXIT_OK


# ----------------------------------------------------------------------------------------
# methods


def _schema_type(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return "|".join(json.dumps(v) for v in prop["enum"])
    if "$ref" in prop:
        return "object"
    if "anyOf" in prop:
        return " or ".join(_schema_type(p) for p in prop["anyOf"])
    t = prop.get("type", "any")
    if t == "array":
        return f"list[{_schema_type(prop.get('items', {}))}]"
    return {"number": "float", "integer": "int", "boolean": "bool", "string": "str"}.get(t, t)


def method_infos() -> list[dict[str, Any]]:
    """``describe_methods()`` with a flat parameter list, keyed by the names a spec uses."""
    out = []
    for m in describe_methods():
        schema = m.get("params_schema", {})
        required = set(schema.get("required", []))
        params, defaults = [], {}
        for name, prop in schema.get("properties", {}).items():
            entry: dict[str, Any] = {"name": name, "type": _schema_type(prop), "description": prop.get("description", "")}
            if "default" in prop:
                entry["default"] = defaults[name] = prop["default"]
            elif name in m.get("defaults", {}):
                entry["default"] = defaults[name] = m["defaults"][name]
            if name in required:
                entry["required"] = True
            params.append(entry)
        out.append({"id": m["id"], "summary": m.get("summary", ""), "defaults": defaults, "params": params,
                    "params_schema": schema})
    return out


def format_methods(infos: list[dict[str, Any]]) -> str:
    lines = []
    for m in infos:
        lines.append(f"{m['id']}: {m['summary']}")
        w = max([len(p["name"]) for p in m["params"]] + [1])
        for p in m["params"]:
            default = "(required)" if p.get("required") else f"= {json.dumps(p.get('default'))}"
            lines.append(f"    {p['name']:<{w}} {default:<10} {p['type']}. {p['description']}".rstrip())
        lines.append("")
    return "\n".join(lines).rstrip()


def cmd_methods(args: argparse.Namespace) -> int:
    infos = method_infos()
    if args.json:
        print(json.dumps(infos, indent=2))
    else:
        print(format_methods(infos))
    return EXIT_OK


# ----------------------------------------------------------------------------------------
# parser


def add_subcommands(subparsers) -> None:
    """Mount ``merge``, ``validate`` and ``methods`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "merge", help="run a merge job from a spec file",
        description="Run a merge job described by a JSON (.json) or YAML (.yaml/.yml) spec file. "
                    "Progress goes to stderr, the summary to stdout.")
    p.add_argument("spec", metavar="SPEC", help="spec file: .json is read as JSON, anything else as YAML")
    p.add_argument("-o", "--output", metavar="URI", help="override output.uri (local path, file:// or s3://)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model at the output URI")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="override options.device")
    p.add_argument("--workers", type=int, metavar="N", help="override options.workers (tensors merged concurrently on CPU)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_merge)

    p = subparsers.add_parser(
        "validate", help="check a spec and the checkpoint headers, print the plan",
        description="Validate a spec and read the checkpoints' headers only (no tensor data); print the merge plan.")
    p.add_argument("spec", metavar="SPEC", help="spec file (.json or .yaml)")
    p.add_argument("-o", "--output", metavar="URI", help="override output.uri")
    p.add_argument("--overwrite", action="store_true", help="as for merge")
    p.add_argument("--json", action="store_true", help="print the plan summary as JSON")
    p.set_defaults(func=cmd_validate)

    p = subparsers.add_parser("methods", help="list merge methods and their parameters",
                              description="List every registered merge method with its parameters and defaults.")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_methods)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="submerge: merge fine-tuned checkpoints of one base model.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_subcommands(sub)
    return parser


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse and run with the one-line error contract."""
    def _run() -> int:
        args = parser.parse_args(argv)
        return args.func(args)
    return run_guarded(_run)


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
