"""The expected failures of the library and its command line, each with its exit code.

An *expected* failure is one the user can fix without reading our code: data that is not
there, a download that could not complete, a checkpoint refused as unsafe, an argument that
names nothing. ``python -m retrieval_lib`` prints such an error as one line on stderr and
exits with its code; every other exception is a bug and keeps its traceback. ``--debug`` (or
``RETRIEVAL_DEBUG=1``) shows the traceback of expected failures too.

Exit codes (listed by ``python -m retrieval_lib --help``):

* 0 -- success;
* 1 -- an unexpected error (a bug: the traceback is printed);
* 2 -- bad command-line usage (:class:`UsageError`, and argparse's own errors);
* 3 -- missing data, weights or a run folder (:class:`MissingDataError`);
* 4 -- a download that failed or did not verify (:class:`FetchError`, and
  :class:`retrieval_lib.data.download.DownloadError` / ``ChecksumError``);
* 5 -- a checkpoint refused (:class:`UnsafeCheckpointError`);
* 6 -- a run that finished but some of its notebooks failed (:class:`NotebooksFailed`).

This module is a leaf: it imports nothing from the library, so every floor can raise these.
"""
from __future__ import annotations

__all__ = ["ExpectedError", "UsageError", "MissingDataError", "FetchError", "UnsafeCheckpointError",
           "NotebooksFailed", "EXIT_CODES"]


class ExpectedError(Exception):
    """Base of the failures the command line reports in one line (``exit_code`` says which)."""

    exit_code = 1


class UsageError(ExpectedError, ValueError):
    """An argument that names nothing there is, or contradicts another one."""

    exit_code = 2


class MissingDataError(ExpectedError, FileNotFoundError):
    """A data set, a network's weights or a run folder that is not where it was asked for."""

    exit_code = 3


class FetchError(ExpectedError, OSError):
    """A download that could not complete (offline, HTTP error) or whose bytes did not verify."""

    exit_code = 4


class UnsafeCheckpointError(ExpectedError, ValueError):
    """A checkpoint file refused: it holds more than plain tensors and numbers, or the wrong keys."""

    exit_code = 5


class NotebooksFailed(ExpectedError, RuntimeError):
    """A run that went on to the end although some notebooks failed (they are named)."""

    exit_code = 6


EXIT_CODES = {
    0: "success",
    1: "unexpected error (a bug: the traceback is printed)",
    2: "bad usage: an argument that names nothing there is",
    3: "missing data, weights or run folder (the message names the download command)",
    4: "a download failed or did not verify",
    5: "a checkpoint was refused as unsafe or malformed",
    6: "the run finished but some notebooks failed (named in results.md)",
}
