"""Command line: ``python -m benchmarks [NAME ...] [--quick] [--out DIR]``.

Runs the chosen benchmarks (default: all; with ``--quick`` all but ``suite``), writes
``<out>/<name>.json`` and ``<out>/<name>.md`` for each, ``<out>/scaling.png``, and
rebuilds ``<out>/results.md`` / ``results.json`` from every benchmark result present in
``<out>`` (so running one benchmark again updates its part of the table only).

Like ``python -m retrieval_lib``, it first applies the library's malloc tuning
(:func:`retrieval_lib.engine.allocator.tune_allocator`; ``RETRIEVAL_ALLOCATOR=system``
keeps glibc's defaults), so every benchmark measures the library as its users run it;
each result records which allocator it ran with. ``cpu`` measures the tuning itself
with and without, side by side.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

from retrieval_lib.engine.allocator import tune_allocator

from .timing import machine_info, machine_line, write_results

BENCHMARKS = ("cpu", "pooling", "extraction", "evaluation", "search", "scaling", "curriculum", "suite")
QUICK = BENCHMARKS[:-1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measured speed and memory of retrieval_lib against simple references.")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run, any of {', '.join(BENCHMARKS)} (default: all; "
                             "with --quick all but suite)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats: checks the scripts in under 2 minutes")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default per benchmark)")
    parser.add_argument("--data", default=None,
                        help="data root holding real171/ (sets RETRIEVAL_DATA; default: the environment)")
    return parser


def _check_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list:
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = list(dict.fromkeys(args.names)) or list(QUICK if args.quick else BENCHMARKS)
    if args.quick and "suite" in names:
        parser.error("suite has no quick mode (it runs the whole test suite and reproduce --scale cpu); "
                     "run `python -m benchmarks suite` without --quick")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return names


def _section_note(res: dict) -> str:
    m = res.get("machine", {})
    load = m.get("load_average")
    note = f"_Run {res.get('measured_at', '?')}"
    note += f", load average {load[0]:.2f} on {m.get('cores')} cores" if load else ""
    note += f", {res.get('benchmark_wall_s', 0):.0f} s"
    alloc = res.get("allocator_state")
    if alloc is not None:
        note += ", malloc tuned" if alloc.get("tuned") else ", glibc malloc defaults"
    if res.get("quick"):
        note += "; quick mode: small sizes, only to check the scripts, not for quoting"
    return note + "._"


def combine(out: Path, info: dict) -> str:
    """Rebuild ``results.md`` / ``results.json`` from every result present in ``out``.

    A benchmark's result comes from ``<name>.json`` when present (the latest run), else
    from the ``results.json`` already there (e.g. the committed one); its markdown is
    regenerated from the result, so the table never mixes stale text with new numbers.
    """
    previous = {}
    if (out / "results.json").exists():
        try:
            previous = json.loads((out / "results.json").read_text()).get("results", {})
        except (ValueError, AttributeError):
            previous = {}
    parts, results = [], {}
    for name in BENCHMARKS:
        js = out / f"{name}.json"
        res = json.loads(js.read_text()) if js.exists() else previous.get(name)
        if res is None:
            continue
        results[name] = res
        mod = importlib.import_module(f"benchmarks.{name}")
        parts.append(mod.to_markdown(res).rstrip() + "\n\n" + _section_note(res))
    header = ["## Performance", "", f"Measured on: {machine_line(info, load=False)}.", "",
              "Ratios, not absolute times, are the claims: each row times a plain reference and the "
              "library in the same process, interleaved, after a warm-up (medians). "
              "The machine is shared: each section says when it ran and the load average then. "
              "Regenerate with `python -m benchmarks` (about 20 min on 2 cores, plus the curriculum's three "
              "`reproduce` runs and the suite).", ""]
    text = "\n".join(header) + "\n" + "\n\n".join(parts) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    return text


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = _check_names(parser, args)
    if args.data is not None:
        os.environ["RETRIEVAL_DATA"] = str(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    allocator = tune_allocator()
    info = machine_info()
    for name in names:
        mod = importlib.import_module(f"benchmarks.{name}")
        before = machine_info()  # the load average as this benchmark starts
        t0 = time.perf_counter()
        extra = {"keep": out / "curriculum_runs"} if name == "curriculum" else {}  # the cpu runs' notebooks
        res = mod.run(quick=args.quick, repeats=args.repeats, **extra)
        res["machine"] = before
        res["allocator_state"] = allocator
        res["benchmark_wall_s"] = time.perf_counter() - t0
        res["measured_at"] = time.strftime("%Y-%m-%d %H:%M")
        md = mod.to_markdown(res)
        write_results(out, name, res, md)
        if name == "scaling":
            mod.plot(res, out / "scaling.png")
        print(md + f"\n\n({name}: {res['benchmark_wall_s']:.1f} s)\n", flush=True)
    combine(out, info)
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
