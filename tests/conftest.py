"""Test-session settings: real photos when present, a private cache, no GUI backend."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("MPLBACKEND", "Agg")
# The real photos beside the checkout (never copied into the repo); CI sets this too.
if "RETRIEVAL_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["RETRIEVAL_DATA"] = str(SHARED_DATA)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Generated data and cached features go to a per-session folder, not ~/.cache."""
    if "RETRIEVAL_CACHE" in os.environ and os.environ.get("RETRIEVAL_TEST_KEEP_CACHE"):
        yield
        return
    old = os.environ.get("RETRIEVAL_CACHE")
    os.environ["RETRIEVAL_CACHE"] = str(tmp_path_factory.mktemp("retrieval_cache"))
    yield
    if old is None:
        os.environ.pop("RETRIEVAL_CACHE", None)
    else:
        os.environ["RETRIEVAL_CACHE"] = old


@pytest.fixture(scope="session")
def data_root():
    """The data root holding real171/ and revisited_gnd/, or None when absent."""
    root = os.environ.get("RETRIEVAL_DATA")
    return Path(root) if root and Path(root).is_dir() else None
