"""The glibc malloc tuning: on by default, off with RETRIEVAL_ALLOCATOR=system, applied once.

The effect is read back, never timed: in a fresh interpreter (the test session's own
malloc must not be changed) a 64 MiB block is allocated, touched, freed, allocated and
touched again. Tuned, glibc serves it from the heap (no new mmap'd block), keeps it after
``free`` and the second touch costs no page faults; with glibc's defaults the block is
mmap'd, unmapped on ``free``, and every page faults again.
"""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval_lib.engine import allocator

REPO = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="the tuning only exists on Linux with glibc")

_PROBE = """
import ctypes, json, logging, resource
records = []
class _Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("retrieval_lib").addHandler(_Keep())
logging.getLogger("retrieval_lib").setLevel(logging.INFO)
from retrieval_lib.engine.allocator import tune_allocator, allocator_state, mallinfo
before = allocator_state()
state = tune_allocator()
again = tune_allocator()  # idempotent: same answer, no second log line
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
N = 64 << 20
m0 = mallinfo()
p = libc.malloc(N)
m1 = mallinfo()
ctypes.memset(p, 1, N)
libc.free(p)
m2 = mallinfo()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(N)
ctypes.memset(p, 2, N)
f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
libc.free(p)
print(json.dumps({"before": before, "state": state, "again": again, "logs": records,
                  "new_mmapped_blocks": m1["hblks"] - m0["hblks"],
                  "kept_after_free": m2["fordblks"] - m0["fordblks"],
                  "second_touch_faults": f1 - f0}))
"""


def _probe(**env) -> dict:
    full = {k: v for k, v in os.environ.items()
            if k not in ("RETRIEVAL_ALLOCATOR", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=full, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_tuned_by_default_keeps_large_blocks():
    res = _probe()
    assert res["before"] is None
    assert res["state"]["tuned"] and res["state"]["mmap_threshold"] == allocator.MMAP_THRESHOLD
    assert res["again"] == res["state"]
    assert len(res["logs"]) == 1 and "RETRIEVAL_ALLOCATOR=system" in res["logs"][0]
    assert res["new_mmapped_blocks"] == 0  # served from the heap
    assert res["kept_after_free"] >= 60 << 20  # still in the process after free (give or take the heap's own churn)
    assert res["second_touch_faults"] < 32  # the pages are already there


@glibc_only
def test_system_switch_keeps_glibc_defaults():
    res = _probe(RETRIEVAL_ALLOCATOR="system")
    assert not res["state"]["tuned"] and "RETRIEVAL_ALLOCATOR=system" in res["state"]["reason"]
    assert len(res["logs"]) == 1 and "defaults kept" in res["logs"][0]
    assert res["new_mmapped_blocks"] == 1  # glibc maps the block ...
    assert res["kept_after_free"] < 1 << 20  # ... and unmaps it on free ...
    assert res["second_touch_faults"] >= 32  # ... so its pages fault again (>= 1 per 2 MiB huge page)


@glibc_only
def test_environment_settings_are_respected():
    res = _probe(MALLOC_MMAP_THRESHOLD_="1048576")
    assert not res["state"]["tuned"] and "MALLOC_MMAP_THRESHOLD_" in res["state"]["reason"]
    res = _probe(LD_PRELOAD="/nonexistent/libjemalloc.so.2")  # a preload that fails only warns
    assert not res["state"]["tuned"] and "jemalloc" in res["state"]["reason"]


@pytest.fixture
def fresh_state(monkeypatch):
    """A clean slate in this process, for the branches that never call mallopt."""
    monkeypatch.setattr(allocator, "_state", None)
    for var in ("RETRIEVAL_ALLOCATOR", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_bad_switch_value_is_an_error(fresh_state):
    fresh_state.setenv("RETRIEVAL_ALLOCATOR", "jemalloc")
    with pytest.raises(ValueError, match="RETRIEVAL_ALLOCATOR='jemalloc' is not understood.*'system'"):
        allocator.tune_allocator()
    assert allocator.allocator_state() is None


def test_no_op_without_glibc(fresh_state, caplog):
    fresh_state.setattr(allocator.sys, "platform", "darwin")
    with caplog.at_level(logging.INFO, logger="retrieval_lib"):
        state = allocator.tune_allocator()
        allocator.tune_allocator()
    assert state == {"tuned": False, "mmap_threshold": None, "trim_threshold": None,
                     "reason": "no glibc on this platform (darwin): malloc left as it is"}
    assert [r.getMessage() for r in caplog.records] == ["allocator: " + state["reason"]]
    assert allocator.mallinfo() is None


@glibc_only
def test_mallinfo_reads_glibc_counters():
    info = allocator.mallinfo()
    assert set(info) >= {"arena", "hblks", "hblkhd", "uordblks", "fordblks"}
    assert info["uordblks"] > 0  # this interpreter has allocated something


_ENTRY_POINTS = """
import json, sys
which = sys.argv[1]
if which == "cli":
    import retrieval_lib.book.reproduce as reproduce
    reproduce.main_reproduce = lambda args: 0  # the command itself is not under test here
    from retrieval_lib.__main__ import main
    assert main(["reproduce", "--notebooks", "none"]) == 0
else:
    from retrieval_lib.book import session

    class _Stop(Exception):
        pass

    def _stop(*a, **k):
        raise _Stop  # stop start() once it is past the tuning: no data or backbone needed
    session.scale_config = _stop
    try:
        session.start("smoke")
    except _Stop:
        pass
from retrieval_lib.engine.allocator import allocator_state
print(json.dumps(allocator_state()))
"""


@glibc_only
@pytest.mark.parametrize("entry", ["cli", "session"])
@pytest.mark.parametrize("switch", ["", "system"])
def test_entry_points_apply_the_tuning(entry, switch):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RETRIEVAL_ALLOCATOR", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")}
    if switch:
        env["RETRIEVAL_ALLOCATOR"] = switch
    out = subprocess.run([sys.executable, "-c", _ENTRY_POINTS, entry], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state is not None and state["tuned"] is (switch != "system")
    if entry == "cli":  # the command line shows the one line on stderr
        lines = [ln for ln in out.stderr.splitlines() if ln.startswith("retrieval_lib: allocator:")]
        assert len(lines) == 1 and ("defaults kept" in lines[0]) is (switch == "system")
