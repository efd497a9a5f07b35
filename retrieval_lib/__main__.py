"""Command line.

``python -m retrieval_lib reproduce [--scale smoke|cpu|full] [--out DIR]``: the off-the-shelf
comparison and every notebook executed, one results table.
``python -m retrieval_lib site [--scale ...] [--out DIR] [--from RUN]``: the executed
notebooks as a static web site (``DIR/index.html``).

Expected failures (missing data, a download that failed, a refused checkpoint, an argument that
names nothing) end with one line on stderr and the exit code of their kind
(:mod:`retrieval_lib.errors`); ``--debug`` or ``RETRIEVAL_DEBUG=1`` shows their traceback too.
Anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from retrieval_lib.book.config import SCALES
from retrieval_lib.book.downloads import add_download_parser, main_download
from retrieval_lib.book.reproduce import main_reproduce
from retrieval_lib.book.site import main_site
from retrieval_lib.engine.allocator import tune_allocator
from retrieval_lib.errors import EXIT_CODES, ExpectedError

_EXIT_HELP = "exit codes:\n" + "\n".join(f"  {code}  {what}" for code, what in EXIT_CODES.items())
_EXAMPLES = {
    None: "examples:\n  python -m retrieval_lib reproduce --scale cpu --out results\n"
          "  python -m retrieval_lib site --from results --out site",
    "reproduce": "examples:\n  python -m retrieval_lib reproduce --scale cpu --out results\n"
                 "  python -m retrieval_lib reproduce --scale smoke --notebooks 00,03 --out r\n"
                 "  python -m retrieval_lib reproduce --scale cpu --data ~/data --notebooks none --out r",
    "site": "examples:\n  python -m retrieval_lib site --scale smoke --out site\n"
            "  python -m retrieval_lib site --from results --out site",
}


def _epilog(command=None) -> str:
    return _EXAMPLES[command] + "\n\n" + _EXIT_HELP + "\n\n--debug (or RETRIEVAL_DEBUG=1) prints the traceback of any error."


def _run_arguments(p: argparse.ArgumentParser, out_default: str, out_help: str) -> None:
    """The arguments of a run of the notebooks, shared by ``reproduce`` and ``site``."""
    p.add_argument("--scale", choices=list(SCALES), default="cpu",
                   help="smoke: seconds; cpu: minutes on a laptop; full: a GPU. What each runs: "
                        + "; ".join(cfg.summary() for cfg in SCALES.values()))
    p.add_argument("--out", default=out_default, help=out_help)
    p.add_argument("--data", default=None,
                   help="data root holding real171/ (full scale: roxford5k/) "
                        "(default: $RETRIEVAL_DATA, else the offline default)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, ...")
    p.add_argument("--backbone", default=None, metavar="NAME",
                   help="the off-the-shelf table's backbone instead of the scale's: a library backbone "
                        "(efficientnet_lite0, resnet101, ...) or the papers' ImageNet weights converted from Caffe "
                        "(imagenet-caffe-resnet101, downloaded once and checked) or such a .pth file")
    p.add_argument("--notebooks", default="all",
                   help="'all', 'none', or a comma list of notebook numbers such as 00,03")
    p.add_argument("--notebooks-dir", default=None, help="where the NN_*.ipynb notebooks are")
    p.add_argument("--cache", default=None, help="feature cache folder (default: $RETRIEVAL_CACHE)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (the executed notebooks never show any)")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m retrieval_lib", formatter_class=raw, epilog=_epilog(),
                                     description="The runnable textbook of deep image retrieval.")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of expected errors too (also RETRIEVAL_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="off-the-shelf comparison + every notebook, one results table",
                         formatter_class=raw, epilog=_epilog("reproduce"))
    _run_arguments(rep, "results", "folder for tables and executed notebooks (relative to the current directory)")
    rep.add_argument("--network", default=None, metavar="NAME[,NAME]", help="measure released networks (names from retrieval_lib.released_networks(), or checkpoint files) on roxford5k+rparis6k in their authors' setting, write OUT/paper_networks.md, and stop")
    site = sub.add_parser("site", help="the executed notebooks as static HTML pages + an index with the results",
                          formatter_class=raw, epilog=_epilog("site"))
    _run_arguments(site, "site", "folder for the pages (index.html, NN_name.html); without --from the "
                                 "notebooks are executed into OUT/run first")
    site.add_argument("--from", dest="from_dir", default=None, metavar="RUN",
                      help="build from this reproduce output folder (its notebooks/NN_name/NN_name.ipynb, "
                           "results.md) instead of executing the notebooks; --scale etc. are then unused")
    add_download_parser(sub)  # download NAME | --list
    return parser


def _debug(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("RETRIEVAL_DEBUG", "").strip() not in ("", "0")


def main(argv=None) -> int:
    """Run a subcommand; expected failures become one stderr line and their exit code."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ExpectedError as err:
        if _debug(args):
            traceback.print_exc()
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    logging.basicConfig(format="%(name)s: %(message)s")  # the library's INFO lines on stderr, no one else's
    logging.getLogger("retrieval_lib").setLevel(logging.INFO)
    tune_allocator()  # once per process (a faster CPU forward); RETRIEVAL_ALLOCATOR=system keeps glibc's malloc
    if args.command == "reproduce":
        return main_reproduce(args)
    if args.command == "site":
        return main_site(args)
    if args.command == "download":
        return main_download(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
