"""Command line: ``python -m retrieval_lib reproduce [--scale smoke|cpu|full] [--out DIR]``."""
from __future__ import annotations

import argparse
import logging
import sys

from retrieval_lib.book.config import SCALES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m retrieval_lib",
                                     description="The runnable textbook of deep image retrieval.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="off-the-shelf comparison + every notebook, one results table")
    rep.add_argument("--scale", choices=list(SCALES), default="cpu",
                     help="smoke: seconds; cpu: minutes on a laptop; full: a GPU. What each runs: "
                          + "; ".join(cfg.summary() for cfg in SCALES.values()))
    rep.add_argument("--out", default="results",
                     help="folder for tables and executed notebooks (relative to the current directory)")
    rep.add_argument("--data", default=None,
                     help="data root holding real171/ (full scale: roxford5k/) "
                          "(default: $RETRIEVAL_DATA, else the offline default)")
    rep.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, ...")
    rep.add_argument("--notebooks", default="all",
                     help="'all', 'none', or a comma list of notebook numbers such as 00,03")
    rep.add_argument("--notebooks-dir", default=None, help="where the NN_*.ipynb notebooks are")
    rep.add_argument("--cache", default=None, help="feature cache folder (default: $RETRIEVAL_CACHE)")
    rep.add_argument("--quiet", action="store_true", help="no progress bars (the executed notebooks never show any)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from retrieval_lib.engine.allocator import tune_allocator

    logging.basicConfig(format="%(name)s: %(message)s")  # the library's INFO lines on stderr, no one else's
    logging.getLogger("retrieval_lib").setLevel(logging.INFO)
    tune_allocator()  # once per process (a faster CPU forward); RETRIEVAL_ALLOCATOR=system keeps glibc's malloc
    if args.command == "reproduce":
        from retrieval_lib.book.reproduce import main_reproduce

        return main_reproduce(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
