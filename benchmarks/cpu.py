"""CPU levers of the EfficientNet-Lite0 forward, each timed side by side with its baseline.

The bare forward ``model.features(x)`` on one batch (8 images of 512x384, as
``extract_descriptors`` batches real171 at the ``cpu`` scale) runs in two child
processes that stay alive for the whole benchmark and take turns, so they never compete
for the cores:

* ``system``: glibc's malloc defaults (``RETRIEVAL_ALLOCATOR=system``): what every run
  was before :func:`retrieval_lib.engine.allocator.tune_allocator`;
* ``tuned``: the library's default, malloc thresholds raised.

Allocator ratio = median system time / median tuned time, repeats interleaved (system,
tuned, system, tuned, ...); minor page faults per forward are read from ``getrusage``
in each process. A third turn in the same rounds times the tuned process with
BatchNorm folded and channels_last together: how far the CPU forward can go against
today's default; two more time both allocators at 1 torch thread, a reading that other
jobs sharing the cores distort far less (no thread team waiting at barriers). Then, in the tuned process, each further lever is timed against the
plain float32 forward at the default thread count, interleaved the same way:

* torch threads: 1 (and the cores) instead of torch's default;
* ``channels_last`` memory format (model and input);
* BatchNorm folded into the preceding convolutions (inference only);
* bfloat16 autocast (reported with whether the CPU has native bf16: AVX512-BF16 or AMX).

Each lever's output is compared with the float32 map (max |diff|). Kept: a lever that is
faster by more than the noise (ratio >= ``KEEP_RATIO``) without changing the maps
beyond float32 rounding. Decoding is timed in this process: PIL as the library does it,
PIL with JPEG ``draft`` (DCT-domain downscaling before the resize) and
``torchvision.io.decode_jpeg`` + a bicubic ``interpolate``, at 512 and 224 px.
"""
from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from retrieval_lib.engine.fold import fold_batchnorm

from .timing import fmt_s, markdown_table

NAME = "cpu"
REPO = Path(__file__).resolve().parents[1]
ALLOCATOR_TARGET = 2.5
KEEP_RATIO = 1.05  # a lever has to win by more than the run-to-run noise of a shared machine
MAP_TOL = 1e-3  # max |diff| of the maps (values in [0, 6]) for a lever that must not change them
_PREFIX = "@@ "


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ------------------------------------------------------------------------- the child process
class _Forward:
    """Lives in a child process: the model, one input batch and the variants of the forward."""

    def __init__(self, batch: int, height: int, width: int, threads: int):
        from retrieval_lib.engine.allocator import tune_allocator
        from retrieval_lib.models.backbones import load_backbone

        self.allocator = tune_allocator()
        self.default_threads = threads or torch.get_num_threads()
        torch.set_num_threads(self.default_threads)
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(batch, 3, height, width, generator=g) * 2 - 1  # normalised images
        self.x_cl = self.x.contiguous(memory_format=torch.channels_last)
        self.model = load_backbone("efficientnet_lite0").eval()
        self.model_cl = copy.deepcopy(self.model).to(memory_format=torch.channels_last)
        self.folded = fold_batchnorm(self.model)
        self.folded_cl = copy.deepcopy(self.folded).to(memory_format=torch.channels_last)
        self.ref = None

    def variant(self, name: str):
        m, x = self.model, self.x
        if name == "fp32":
            return lambda: m.features(x)
        if name == "channels_last":
            return lambda: self.model_cl.features(self.x_cl)
        if name == "bn_folded":
            return lambda: self.folded.features(x)
        if name == "bn_folded+channels_last":
            return lambda: self.folded_cl.features(self.x_cl)
        if name == "bf16":
            def run():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return m.features(x).float()
            return run
        raise ValueError(f"unknown variant {name!r}")

    def time(self, variant: str, threads: int | None = None) -> dict:
        fn = self.variant(variant)
        torch.set_num_threads(threads or self.default_threads)
        try:
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            with torch.inference_mode():
                fn()
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
        finally:
            torch.set_num_threads(self.default_threads)
        return {"wall_s": wall, "cpu_s": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
                "minor_faults": r1.ru_minflt - r0.ru_minflt}

    def diff(self, variant: str) -> dict:
        with torch.inference_mode():
            if self.ref is None:
                self.ref = self.variant("fp32")()
            out = self.variant(variant)()
        return {"max_abs_diff": (out.float() - self.ref).abs().max().item(),
                "ref_max": self.ref.abs().max().item()}

    def info(self) -> dict:
        return {"allocator": self.allocator, "threads": self.default_threads, "pid": os.getpid()}


def _serve() -> None:
    """Child process main loop: one JSON command per stdin line, one ``@@ {json}`` answer per line."""
    state = None
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "setup":
                state = _Forward(**cmd["args"])
                out = state.info()
            elif cmd["op"] == "quit":
                break
            else:
                out = getattr(state, cmd["op"])(**cmd.get("args", {}))
        except Exception as err:  # report to the parent instead of dying silently
            out = {"error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(_PREFIX + json.dumps(out) + "\n")
        sys.stdout.flush()


class Worker:
    """Parent side of a child process running :func:`_serve` with its own environment."""

    def __init__(self, allocator: str, **setup):
        env = dict(os.environ, RETRIEVAL_ALLOCATOR=allocator)
        for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
            env.pop(var, None)  # the two processes must differ only by the switch
        self.proc = subprocess.Popen([sys.executable, "-c", "from benchmarks.cpu import _serve; _serve()"],
                                     cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.info = self.call("setup", **setup)

    def call(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(_PREFIX):
                out = json.loads(line[len(_PREFIX):])
                if "error" in out:
                    raise RuntimeError(f"benchmark child process: {out['error']}")
                return out
        raise RuntimeError(f"benchmark child process exited (code {self.proc.wait()})")

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def interleave(fns, repeats: int, warmup: int = 1) -> list:
    """Call each of ``fns`` in turn (each returns a timing dict), ``warmup`` rounds unrecorded,
    then ``repeats`` rounds; one list of timing dicts per function."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    out = [[] for _ in fns]
    for _ in range(repeats):
        for rs, fn in zip(out, fns):
            rs.append(fn())
    return out


def _median(rs: list, key: str) -> float:
    return statistics.median(r[key] for r in rs)


def side_by_side(a, b, repeats: int, warmup: int = 1) -> dict:
    """Interleave ``a()`` and ``b()`` (each returns a timing dict); medians and ratio a/b."""
    ra, rb = interleave([a, b], repeats, warmup)
    ratios = [x["wall_s"] / y["wall_s"] for x, y in zip(ra, rb)]
    return {"a_s": _median(ra, "wall_s"), "b_s": _median(rb, "wall_s"),
            "ratio": _median(ra, "wall_s") / _median(rb, "wall_s"), "ratio_per_repeat": ratios,
            "a_faults": _median(ra, "minor_faults"), "b_faults": _median(rb, "minor_faults"),
            "a_cpu_s": _median(ra, "cpu_s"), "b_cpu_s": _median(rb, "cpu_s"), "a": ra, "b": rb}


# ------------------------------------------------------------------------- decoding
def decoders(image_size: int) -> dict:
    """Ways to go from a JPEG file to the uint8 ``(3, h, w)`` network input of ``image_size`` px."""
    import torch.nn.functional as F
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    from retrieval_lib.data.images import load_image
    from retrieval_lib.data.images import resize_longer_side, to_tensor

    def target(w, h):
        s = image_size / max(w, h)
        return max(1, round(w * s)), max(1, round(h * s))

    def pil(path):
        return to_tensor(resize_longer_side(load_image(path), image_size))

    def draft(path):
        with Image.open(path) as im:
            size = im.size
            im.draft("RGB", target(*size))
            im = im.convert("RGB")
        w, h = target(*size)  # the size the full decode would give, not one from the reduced image
        return to_tensor(im if im.size == (w, h) else im.resize((w, h), Image.BICUBIC))

    def tv(path):
        x = decode_jpeg(read_file(path), mode=ImageReadMode.RGB)  # (3, H, W) uint8
        w, h = target(x.shape[2], x.shape[1])
        if (h, w) == tuple(x.shape[1:]):
            return x
        y = F.interpolate(x[None].float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        return y.round_().clamp_(0, 255).to(torch.uint8)[0]

    return {"PIL (library)": pil, "PIL + JPEG draft": draft, "torchvision decode_jpeg + interpolate": tv}


def time_decoding(paths, image_size: int, repeats: int) -> list:
    """Per-image decode+resize time of each decoder (interleaved, medians) and its pixel difference to PIL's."""
    fns = decoders(image_size)
    ref = [fns["PIL (library)"](p) for p in paths]
    times: dict = {k: [] for k in fns}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a decoding worker is single-threaded
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for p in paths:
                    fn(p)
                times[name].append((time.perf_counter() - t0) / len(paths))
    finally:
        torch.set_num_threads(threads)
    rows = []
    for name, fn in fns.items():
        outs = [fn(p) for p in paths]
        same_shape = all(a.shape == b.shape for a, b in zip(outs, ref))
        diff = max(((a.int() - b.int()).abs().max().item() for a, b in zip(outs, ref) if a.shape == b.shape),
                    default=None)
        mean_diff = statistics.mean((a.float() - b.float()).abs().mean().item() for a, b in zip(outs, ref)
                                    if a.shape == b.shape)
        rows.append({"decoder": name, "image_size": image_size, "s_per_image": statistics.median(times[name]),
                     "speedup": statistics.median(times["PIL (library)"]) / statistics.median(times[name]),
                     "same_shape": same_shape, "max_pixel_diff": diff, "mean_pixel_diff": mean_diff})
    return rows


# ------------------------------------------------------------------------- scale-out
def time_scale_out(n_images: int, image_size: int, repeats: int, processes: int) -> dict:
    """Extraction of the first ``n_images`` of the default benchmark: one process with torch's
    default threads vs ``processes`` torchrun processes of 1 thread each (``extract_sharded``,
    gloo), interleaved; each run is a fresh interpreter (``benchmarks/_sharded_extract.py``).
    """
    import tempfile

    script = str(REPO / "benchmarks" / "_sharded_extract.py")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    threads = torch.get_num_threads()
    runs: dict = {"single": [], "sharded": []}
    X = {}
    with tempfile.TemporaryDirectory() as tmp:
        cmds = {
            "single": [sys.executable, script, f"{tmp}/single.pt", str(n_images), str(image_size), str(threads)],
            "sharded": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={processes}", script, f"{tmp}/sharded.pt", str(n_images),
                        str(image_size), "1"],
        }
        for _ in range(repeats):
            for key, cmd in cmds.items():
                t0 = time.perf_counter()
                done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
                wall = time.perf_counter() - t0
                if done.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
                got = torch.load(f"{tmp}/{key}.pt", weights_only=False)
                X[key] = got["X"]
                runs[key].append({"extract_s": got["seconds"], "command_s": wall, "dataset": got["dataset"]})
    med = {k: statistics.median(r["extract_s"] for r in v) for k, v in runs.items()}
    return {"n_images": n_images, "image_size": image_size, "processes": processes, "threads_single": threads,
            "repeats": repeats, "dataset": runs["single"][0]["dataset"], "runs": runs,
            "single_s": med["single"], "sharded_s": med["sharded"], "speedup": med["single"] / med["sharded"],
            "command_s": {k: statistics.median(r["command_s"] for r in v) for k, v in runs.items()},
            "max_abs_diff": (X["single"] - X["sharded"]).abs().max().item(),
            "identical": torch.equal(X["single"], X["sharded"])}


# ------------------------------------------------------------------------- run
BEST = "bn_folded+channels_last"  # the exact levers together, timed beside today's default too
LEVERS = [
    # (label, variant, threads (None: the default), must keep the maps)
    ("1 torch thread", "fp32", 1, True),
    ("channels_last", "channels_last", None, True),
    ("BatchNorm folded", "bn_folded", None, True),
    ("BatchNorm folded + channels_last", "bn_folded+channels_last", None, True),
    ("bfloat16 autocast", "bf16", None, False),
]


def run(quick: bool = False, repeats: int | None = None, batch: int = 8, size: tuple = (384, 512)) -> dict:
    """Run the CPU-lever benchmark; return a JSON-able dict with ``allocator``, ``levers``, ``decoding``."""
    from .extraction import photos

    repeats = repeats or (2 if quick else 7)
    if quick:
        batch, size = 2, (96, 128)
    cores = os.cpu_count() or 1
    bf16 = cpu_has_bf16()
    setup = {"batch": batch, "height": size[0], "width": size[1], "threads": 0}
    load0 = os.getloadavg()
    system = Worker("system", **setup)
    try:
        tuned = Worker("tuned", **setup)
        try:
            # today's default, the tuning alone, and the tuning with the two exact levers on top
            # and both allocators at 1 thread: no thread team to stall when other jobs share the cores
            rs, rt, rb, rs1, rt1 = interleave([lambda: system.call("time", variant="fp32"),
                                               lambda: tuned.call("time", variant="fp32"),
                                               lambda: tuned.call("time", variant=BEST),
                                               lambda: system.call("time", variant="fp32", threads=1),
                                               lambda: tuned.call("time", variant="fp32", threads=1)], repeats)
            alloc = {"system_s": _median(rs, "wall_s"), "tuned_s": _median(rt, "wall_s"),
                     "best_s": _median(rb, "wall_s"),
                     "speedup_per_repeat": [x["wall_s"] / y["wall_s"] for x, y in zip(rs, rt)],
                     "best_speedup_per_repeat": [x["wall_s"] / y["wall_s"] for x, y in zip(rs, rb)],
                     "system_faults": _median(rs, "minor_faults"), "tuned_faults": _median(rt, "minor_faults"),
                     "best_faults": _median(rb, "minor_faults"), "system_cpu_s": _median(rs, "cpu_s"),
                     "tuned_cpu_s": _median(rt, "cpu_s"), "best_cpu_s": _median(rb, "cpu_s")}
            alloc["one_thread"] = {"system_s": _median(rs1, "wall_s"), "tuned_s": _median(rt1, "wall_s"),
                                   "system_cpu_s": _median(rs1, "cpu_s"), "tuned_cpu_s": _median(rt1, "cpu_s"),
                                   "speedup_per_repeat": [x["wall_s"] / y["wall_s"] for x, y in zip(rs1, rt1)]}
            alloc["one_thread"]["speedup"] = alloc["one_thread"]["system_s"] / alloc["one_thread"]["tuned_s"]
            alloc["speedup"] = alloc["system_s"] / alloc["tuned_s"]
            alloc["best_speedup"] = alloc["system_s"] / alloc["best_s"]
            levers = []
            extra = [] if cores <= 1 or tuned.info["threads"] == cores else [(f"{cores} torch threads", "fp32",
                                                                               cores, True)]
            for label, variant, threads, exact in LEVERS + extra:
                if threads is not None and threads == tuned.info["threads"]:
                    continue  # the same as the baseline
                # emulated bf16 (no AVX512-BF16 / AMX) is an order of magnitude slower: one repeat tells
                slow = variant == "bf16" and not bf16
                load = os.getloadavg()[0]
                cmp = side_by_side(lambda: tuned.call("time", variant="fp32"),
                                   lambda: tuned.call("time", variant=variant, threads=threads),
                                   1 if slow else repeats, warmup=0 if slow else 1)
                d = tuned.call("diff", variant=variant)
                load = max(load, os.getloadavg()[0])
                levers.append({"lever": label, "variant": variant, "threads": threads, "repeats": len(cmp["a"]),
                               "load_average": load, "baseline_s": cmp["a_s"],
                               "lever_s": cmp["b_s"], "speedup": cmp["ratio"],
                               "speedup_per_repeat": cmp["ratio_per_repeat"],
                               "max_abs_diff": d["max_abs_diff"], "exact": d["max_abs_diff"] <= MAP_TOL,
                               "faster": cmp["ratio"] >= KEEP_RATIO})
            system_info, tuned_info = system.info, tuned.info
        finally:
            tuned.close()
    finally:
        system.close()
    name, images = photos(quick)
    paths = list(images.paths)
    decoding = []
    for image_size in ((256,) if quick else (512, 224)):
        decoding += time_decoding(paths, image_size, 1 if quick else 3)
    scale_out = None
    if cores > 1:
        scale_out = time_scale_out(8 if quick else len(paths), 128 if quick else 512, 1 if quick else 3, cores)
    return {
        "name": NAME, "quick": quick, "repeats": repeats, "batch": batch, "input_hw": list(size), "cores": cores,
        "load_average_before": list(load0), "load_average_after": list(os.getloadavg()),
        "system": system_info, "tuned": tuned_info,
        "allocator": alloc, "best_variant": BEST,
        "levers": levers, "cpu_bf16": bf16,
        "decoding_dataset": name, "decoding": decoding, "scale_out": scale_out,
        "summary": {"allocator_speedup": alloc["speedup"],
                    "allocator_target_met": alloc["speedup"] >= ALLOCATOR_TARGET,
                    "best_speedup": alloc["best_speedup"],
                    "kept": [lv["lever"] for lv in levers if verdict(lv, cores) == "yes"]},
    }


def verdict(lever: dict, cores: int) -> str:
    """``yes`` / ``no`` for a lever, or why its timing cannot decide.

    A thread-count lever measured while more runnable processes than cores competed
    (1-min load average above the cores) says more about the other jobs than about the
    lever: a team of intra-op threads waits at every barrier for its slowest thread, and a
    descheduled thread makes all of them wait, so fewer threads win under contention.
    """
    if not (lever["faster"] and lever["exact"]):
        return "no"
    if lever["threads"] is not None and lever["load_average"] > cores:
        return f"not decided (load {lever['load_average']:.1f} on {cores} cores)"
    return "yes"


def to_markdown(res: dict) -> str:
    a, s = res["allocator"], res["summary"]
    h, w = res["input_hw"]
    lines = [
        "### CPU levers of the Lite0 forward", "",
        f"Bare `model.features` of EfficientNet-Lite0 on a batch of {res['batch']} images of {w}x{h}, "
        f"{res['tuned']['threads']} torch threads on {res['cores']} cores, in two child processes that take "
        f"turns (median of {res['repeats']} interleaved repeats). Load average {res['load_average_before'][0]:.2f} "
        f"before, {res['load_average_after'][0]:.2f} after.", "",
        markdown_table(["malloc", "forward", "CPU s", "minor page faults / forward", "speedup"], [
            ["glibc defaults (`RETRIEVAL_ALLOCATOR=system`)", fmt_s(a["system_s"]), f"{a['system_cpu_s']:.2f}",
             f"{a['system_faults']:.0f}", "1.00x"],
            ["tuned (library default)", fmt_s(a["tuned_s"]), f"{a['tuned_cpu_s']:.2f}", f"{a['tuned_faults']:.0f}",
             f"{a['speedup']:.2f}x"],
            ["tuned + BatchNorm folded + channels_last", fmt_s(a["best_s"]), f"{a['best_cpu_s']:.2f}",
             f"{a['best_faults']:.0f}", f"{a['best_speedup']:.2f}x"],
            ["glibc defaults, 1 torch thread", fmt_s(a["one_thread"]["system_s"]),
             f"{a['one_thread']['system_cpu_s']:.2f}", "", "1.00x"],
            ["tuned, 1 torch thread", fmt_s(a["one_thread"]["tuned_s"]), f"{a['one_thread']['tuned_cpu_s']:.2f}", "",
             f"{a['one_thread']['speedup']:.2f}x"],
        ]), "",
        f"Allocator speedup {a['speedup']:.2f}x (target >= {ALLOCATOR_TARGET}x: "
        f"{'met' if s['allocator_target_met'] else 'NOT met'}; per repeat: "
        + ", ".join(f"{r:.2f}" for r in a["speedup_per_repeat"]) + f"; in CPU time "
        f"{a['system_cpu_s'] / max(a['tuned_cpu_s'], 1e-9):.2f}x). With the two exact levers below on top: "
        f"{a['best_speedup']:.2f}x today's default (per repeat: "
        + ", ".join(f"{r:.2f}" for r in a["best_speedup_per_repeat"]) + "). At 1 thread per process, where "
        f"other jobs on the cores cannot stall a thread team: {a['one_thread']['speedup']:.2f}x (per repeat: "
        + ", ".join(f"{r:.2f}" for r in a["one_thread"]["speedup_per_repeat"]) + ").", "",
        "Further levers, each against the plain float32 forward in the tuned process (interleaved):", "",
        markdown_table(["lever", "baseline", "with the lever", "speedup", "max |diff| of the map", "load average",
                        "kept"], [
            [lv["lever"], fmt_s(lv["baseline_s"]), fmt_s(lv["lever_s"]), f"{lv['speedup']:.2f}x",
             f"{lv['max_abs_diff']:.1e}", f"{lv['load_average']:.1f}", verdict(lv, res["cores"])]
            for lv in res["levers"]]), "",
        f"Kept: a lever at least {KEEP_RATIO:.2f}x faster that leaves the map within {MAP_TOL:g} "
        f"(bfloat16 changes it by design); a thread count only when the load average stayed within the "
        f"cores. Native bf16 on this CPU: {'yes' if res['cpu_bf16'] else 'no'}"
        + ("" if res["cpu_bf16"] else " (emulated: timed once)") + ".", "",
        f"Decoding one photo of {res['decoding_dataset']} to the network input (1 thread, median of repeats):", "",
        markdown_table(["decoder", "px", "per image", "speedup", "same sizes", "max / mean pixel diff to PIL"], [
            [r["decoder"], r["image_size"], fmt_s(r["s_per_image"]), f"{r['speedup']:.2f}x",
             r["same_shape"], f"{r['max_pixel_diff']} / {r['mean_pixel_diff']:.2f}"]
            for r in res["decoding"]]),
    ]
    so = res.get("scale_out")
    if so:
        lines += [
            "", f"Scale-out on the CPU: `extract_descriptors` of {so['n_images']} photos of {so['dataset']} at "
            f"{so['image_size']} px (GeM) in one process with {so['threads_single']} torch threads, against "
            f"`torchrun --nproc_per_node={so['processes']}` with 1 thread each (`extract_sharded`, gloo; rank 0 "
            f"gathers). Extraction time from a barrier after loading to the gathered result, median of "
            f"{so['repeats']} interleaved runs (whole command, start-up included, in brackets):", "",
            markdown_table(["run", "extraction", "images/s", "speedup"], [
                [f"1 process x {so['threads_single']} threads", f"{fmt_s(so['single_s'])} "
                 f"({fmt_s(so['command_s']['single'])})", f"{so['n_images'] / so['single_s']:.1f}", "1.00x"],
                [f"{so['processes']} processes x 1 thread", f"{fmt_s(so['sharded_s'])} "
                 f"({fmt_s(so['command_s']['sharded'])})", f"{so['n_images'] / so['sharded_s']:.1f}",
                 f"{so['speedup']:.2f}x"]]), "",
            "Descriptors against the single process's: " + (
                "identical." if so["identical"] else
                f"equal to float32 rounding (max |diff| {so['max_abs_diff']:.1e}: 1 and 2 threads per process "
                "sum the convolutions in different orders; tests/test_distributed.py checks identity at equal "
                "thread counts)." if so["max_abs_diff"] < 1e-5 else
                f"DIFFERENT (max |diff| {so['max_abs_diff']:.1e})."),
        ]
    return "\n".join(lines)
