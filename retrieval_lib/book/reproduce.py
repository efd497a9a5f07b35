"""The main job: ``python -m retrieval_lib reproduce``.

1. The off-the-shelf comparison of MAC, SPoC, GeM (p=3) and R-MAC (L=3) on the scale's
   benchmark (:func:`~retrieval_lib.book.config.benchmark_for_scale`, the same data the
   notebooks measure at that scale), written as ``offtheshelf.md`` and ``offtheshelf.json``.
2. Every notebook ``notebooks/NN_*.ipynb`` executed in order with papermill at the same
   scale, the executed copies saved, and every ``metrics.json`` gathered into
   ``results.md`` / ``results.json`` with the papers' numbers beside ours.

The notebooks run with the notebooks folder as working directory, so every path handed
to them (``OUT_DIR``, ``DATA_ROOT``, ``RETRIEVAL_DATA``, ``RETRIEVAL_CACHE``) is made
absolute first; they run with ``RETRIEVAL_PROGRESS=0`` so the saved copies hold no
progress widgets.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from retrieval_lib.book.config import DRY_RUN_SETTINGS_CELL, benchmark_for_scale, max_size, scale_config
from retrieval_lib.book.offtheshelf import (check_table_backbone, extraction_line, offtheshelf, offtheshelf_measured,
                                             offtheshelf_table, table_backbone)
from retrieval_lib.book.paper_networks import main_paper_networks
from retrieval_lib.book.report import markdown_table, read_metrics, results_table
from retrieval_lib.engine.distributed import dist_env, process_group
from retrieval_lib.errors import MissingDataError, NotebooksFailed, UsageError

__all__ = ["offtheshelf", "offtheshelf_table", "offtheshelf_measured", "gather_results", "run_notebooks",
           "find_notebooks", "select_notebooks", "check_data_root", "check_table_backbone", "table_backbone",
           "merge_results", "write_results", "with_dry_run_cell", "CELL_TIMEOUT_S"]

# per-cell limit: a hang at smoke scale fails within two minutes (a smoke cell takes seconds on an idle
# 2-core machine; 04's cold multi-scale extraction passed a minute when two other jobs shared the cores);
# cpu/full cells may extract for long
CELL_TIMEOUT_S = {"smoke": 120, "cpu": 1800, "full": 4 * 3600}


# what torchrun (torch.distributed.run) hands its processes: a notebook kernel started by process 0 must not
# inherit it, or its first Trainer would try to rejoin processes that have already exited
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def gather_results(results_dir) -> dict | None:
    """What a ``reproduce`` run left in ``results_dir``; ``None`` when it holds no ``offtheshelf.json``.

    Returns ``{"dir", "offtheshelf" (its JSON), "notebooks" (every ``metrics.json`` under
    ``notebooks/``, sorted by notebook), "measured" (the off-the-shelf entries, then each
    notebook's ``measured`` entries marked with ``from``: the notebook)}``. A notebook still
    running (this one, inside ``reproduce``) has written no metrics yet and is simply absent.
    """
    root = Path(results_dir).expanduser()
    path = root / "offtheshelf.json"
    if not path.is_file():
        return None
    shelf = json.loads(path.read_text())
    docs = sorted((read_metrics(p) for p in (root / "notebooks").rglob("metrics.json")),
                  key=lambda d: d["notebook"])
    ours = offtheshelf_measured(shelf)
    for doc in docs:
        for entry in doc.get("measured") or []:
            ours.append(dict(entry, **{"from": doc["notebook"]}))
    return {"dir": str(root.resolve()), "offtheshelf": shelf, "notebooks": docs, "measured": ours}


def find_notebooks(notebooks_dir=None, only=None) -> list[Path]:
    """The numbered notebooks ``NN_*.ipynb`` in order (optionally only those whose NN is listed).

    ``notebooks_dir`` defaults to ``notebooks/`` in the current directory, else the one in the
    checkout this package was installed from (``pip install -e .``).
    """
    if notebooks_dir:
        places = [Path(notebooks_dir).expanduser().resolve()]
    else:
        places = [Path.cwd() / "notebooks", Path(__file__).resolve().parents[2] / "notebooks"]
    nb_dir = next((d for d in places if d.is_dir()), None)
    if nb_dir is None:
        raise MissingDataError(f"no notebooks folder at {' or '.join(str(d) for d in places)}; run from the "
                                "repository's root or pass --notebooks-dir DIR")
    found = sorted(p for p in nb_dir.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if p.name[:2] in set(only)]
    return found


def select_notebooks(spec: str, notebooks_dir=None) -> list[str]:
    """The notebook numbers (``"00"``, ``"03"``, ...) a ``--notebooks`` value names, checked.

    ``spec``: ``"all"``, ``"none"`` or a comma list of numbers (``3``, ``03``) or names
    (``03_gem``). Raises :class:`~retrieval_lib.errors.UsageError` listing the notebooks there
    are when an item names none of them, so a typo never gives a run without the notebook asked for.
    """
    spec = (spec or "").strip()
    if spec == "none":
        return []
    found = find_notebooks(notebooks_dir)
    numbers = [p.name[:2] for p in found]
    if spec == "all":
        return numbers
    chosen, unknown = [], []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        number = item.zfill(2) if item.isdigit() and len(item) <= 2 else None
        match = [p.name[:2] for p in found if p.name[:2] == number or p.stem == item]
        if match:
            chosen += [m for m in match if m not in chosen]
        else:
            unknown.append(item)
    if unknown or not chosen:
        listed = ", ".join(p.stem for p in found)
        what = ", ".join(repr(u) for u in unknown) if unknown else repr(spec)
        raise UsageError(f"--notebooks {what} names no notebook; there are: {listed} "
                         "(give numbers such as 00,03, names such as 03_gem, 'all' or 'none')")
    return sorted(chosen)


def check_data_root(scale, data) -> Path:
    """An explicit ``--data`` folder, checked for what ``scale`` measures; returns it absolute.

    Raises :class:`~retrieval_lib.errors.MissingDataError` when the folder does not exist or lacks
    the scale's data set (``real171`` at ``smoke``/``cpu``, revisited Oxford at ``full``), naming
    the ``download`` command that fetches it. (A data root that only comes from ``RETRIEVAL_DATA``
    is not checked here: the data sets fall back to the offline default with a warning.)
    """
    cfg = scale_config(scale)
    root = _absolute(data)
    if root is None or not root.is_dir():
        raise MissingDataError(f"--data {data}: no such folder. Create it and fetch the data with "
                               f"`python -m retrieval_lib download {_needed(cfg)} --data {data}`, or leave "
                               "--data out to run on the offline default")
    if cfg.data == "default":
        if not (root / "real171" / "manifest.json").is_file():
            raise MissingDataError(
                f"--data {data}: no real171/manifest.json there ({cfg.name} scale measures real171 when a data "
                f"root is given). Fetch it with `python -m retrieval_lib download real171 --data {data}`, "
                "or leave --data out to run on the offline default")
    else:
        benchmark_for_scale(cfg, root)  # raises MissingDataError naming the download command
    return root


def _needed(cfg) -> str:
    return "real171" if cfg.data == "default" else cfg.data


@contextlib.contextmanager
def _environ(**values):
    """Set environment variables (``None``: unset) for the duration of a block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _absolute(path) -> Path | None:
    return None if path is None or str(path).strip() == "" else Path(path).expanduser().resolve()


def _ipc_kernel_manager():
    """A kernel manager whose kernels talk over Unix sockets (IPC) instead of TCP on loopback.

    ipykernel warns "Kernel is running over TCP without encryption" once per kernel started over
    TCP; ``reproduce`` starts one per notebook, so the warning buried the run's own lines. IPC
    sockets live beside the kernel's connection file in Jupyter's runtime folder and are readable
    by this user only.
    """
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class IPCKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

    return IPCKernelManager


def with_dry_run_cell(path):
    """The notebook at ``path`` as an nbformat node -- with :data:`~retrieval_lib.book.config.DRY_RUN_SETTINGS_CELL`
    right after its ``parameters`` cell when ``RETRIEVAL_MAX_SIZE`` asks for a dry run (papermill then puts
    its injected parameters between the two), else unchanged."""
    import nbformat

    doc = nbformat.read(str(path), as_version=4)
    if max_size() is None:
        return doc
    at = next((i for i, c in enumerate(doc.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if at is None:
        raise UsageError(f"{Path(path).name} has no cell tagged 'parameters': a dry run cannot set its settings")
    cell = nbformat.v4.new_code_cell(DRY_RUN_SETTINGS_CELL, metadata={"tags": ["dry-run-settings"]})
    doc.cells.insert(at + 1, cell)
    return doc


def run_notebooks(scale: str, out_dir, notebooks_dir=None, only=None, data_root=None,
                  progress: bool = True) -> list[dict]:
    """Execute the notebooks with papermill; return the gathered metrics documents.

    Each notebook runs with its own folder as working directory, so ``out_dir`` and
    ``data_root`` (default ``RETRIEVAL_DATA``) are handed over as absolute paths, and
    ``RETRIEVAL_DATA`` / ``RETRIEVAL_CACHE`` are made absolute in the kernel's environment.
    The kernel gets ``RETRIEVAL_PROGRESS=0`` (no progress widgets in the saved notebooks) and
    ``RETRIEVAL_RESULTS`` = the folder above ``out_dir`` (``--out``: what ``09_reproductions`` reads),
    and none of torchrun's process-group variables; ``progress`` is papermill's own bar over the cells.
    In a dry run (``RETRIEVAL_MAX_SIZE``) each notebook runs with its per-scale settings at smoke's values
    (:func:`with_dry_run_cell`).

    A notebook that fails (an error in a cell, a cell out of time, a dead kernel) does not stop
    the others: its document is ``{"notebook", "failed": True, "cell", "error", "seconds", "ours": {}}``
    (``cell``: the execution count ``In [n]`` of the failing cell in the executed copy, ``None`` if unknown)
    and its executed copy (up to the failing cell) is kept.
    """
    import papermill as pm

    out_dir = _absolute(out_dir)
    data_root = _absolute(data_root if data_root is not None else os.environ.get("RETRIEVAL_DATA"))
    cache = _absolute(os.environ.get("RETRIEVAL_CACHE"))
    docs = []
    # RETRIEVAL_RESULTS: the folder above out_dir, where offtheshelf.json is (09_reproductions reads it)
    env = dict(RETRIEVAL_PROGRESS="0", RETRIEVAL_SCALE=scale, RETRIEVAL_DATA=data_root, RETRIEVAL_CACHE=cache,
               RETRIEVAL_RESULTS=out_dir.parent)
    env.update({k: None for k in os.environ if k in _TORCHRUN_ENV or k.startswith("TORCHELASTIC_")})
    manager = _ipc_kernel_manager()
    with _environ(**env):
        for nb in find_notebooks(notebooks_dir, only):
            nb_out = out_dir / nb.stem
            nb_out.mkdir(parents=True, exist_ok=True)
            (nb_out / "metrics.json").unlink(missing_ok=True)  # an earlier run's numbers never pass for this one's
            params = {"SCALE": scale, "OUT_DIR": str(nb_out)}
            if data_root is not None:
                params["DATA_ROOT"] = str(data_root)
            t0 = time.perf_counter()
            try:
                # a per-cell limit, so that a stuck cell fails the notebook instead of hanging the run
                with _environ(RETRIEVAL_NOTEBOOK=nb.stem):  # names the notebook in book.widget_check's records
                    pm.execute_notebook(with_dry_run_cell(nb), str(nb_out / nb.name), parameters=params, progress_bar=progress,
                                        cwd=str(nb.parent), kernel_name="python3",
                                        execution_timeout=CELL_TIMEOUT_S[scale], kernel_manager_class=manager)
                doc = read_metrics(nb_out)
            except Exception as err:  # the notebook's failure is recorded; the run goes on with the next
                doc = {"notebook": nb.stem, "failed": True, "cell": getattr(err, "exec_count", None),
                       "error": _one_line(err), "ours": {}, "scale": scale}
            doc["seconds"] = time.perf_counter() - t0
            docs.append(doc)
    return docs


def _one_line(err: BaseException, limit: int = 400) -> str:
    """``Type: message`` of a failure on one line (papermill's errors name the notebook's own exception)."""
    name, value = getattr(err, "ename", None), getattr(err, "evalue", None)
    text = f"{name}: {value}" if name else f"{type(err).__name__}: {err}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def merge_results(out, docs: list[dict]) -> list[dict]:
    """This run's notebook documents merged into ``out/results.json`` (a notebook rerun replaces its entry),
    sorted by notebook; a rerun of some notebooks after a failure keeps the others' results."""
    merged = {}
    path = Path(out) / "results.json"
    if path.is_file():
        try:
            merged = {d["notebook"]: d for d in json.loads(path.read_text()) if isinstance(d, dict) and "notebook" in d}
        except (ValueError, TypeError):
            merged = {}
    merged.update({d["notebook"]: d for d in docs})
    return [merged[k] for k in sorted(merged)]


def write_results(out, docs: list[dict]) -> str:
    """``results.md`` / ``results.json`` for the documents ``docs``; returns the markdown written."""
    ran = [d for d in docs if not d.get("failed")]
    failed = [d for d in docs if d.get("failed")]
    parts = [results_table(ran)] if ran else []
    if failed:
        rows = [[d["notebook"], d.get("cell"), d["error"]] for d in failed]
        parts.append("Notebooks that failed (their executed copies show the cell; the others ran):\n\n"
                     + markdown_table(["notebook", "cell (In [n])", "error"], rows))
    parts.append("What each notebook measured, at which scale (the learned notebooks measure their honest split, "
                 "not the scale's benchmark; each says why in its first cells):\n\n"
                 + markdown_table(["notebook", "scale", "measured on", "seconds", "status"],
                                  [[d["notebook"], d.get("scale"), d.get("data") or "-", d["seconds"],
                                    "failed" if d.get("failed") else "ran"] for d in docs]))
    text = "\n\n".join(parts)
    (Path(out) / "results.md").write_text(text + "\n")
    (Path(out) / "results.json").write_text(json.dumps(docs, indent=2, default=float) + "\n")
    return text


def main_reproduce(args) -> int:
    """Entry point behind ``python -m retrieval_lib reproduce``.

    Under ``torchrun --nproc_per_node=N -m retrieval_lib reproduce ...`` the off-the-shelf
    extraction is shared by the N processes (one per GPU); process 0 then writes the tables
    and runs the notebooks, one after the other, on its GPU; the others exit.

    Relative ``--out``, ``--data`` and ``--cache`` are taken from the current directory
    (and passed on as absolute paths). The environment is restored afterwards.
    """
    # every argument is checked before anything is written to --out
    only = select_notebooks(args.notebooks, args.notebooks_dir)
    backbone = getattr(args, "backbone", None)
    if backbone is not None:
        check_table_backbone(backbone)
    cache = _absolute(args.cache or os.environ.get("RETRIEVAL_CACHE") or Path.home() / ".cache" / "retrieval_lib")
    if getattr(args, "network", None):  # released networks in their authors' setting: book.paper_networks
        data = _absolute(args.data if args.data is not None else os.environ.get("RETRIEVAL_DATA"))
        return main_paper_networks(args, _absolute(args.out), data, cache)  # writes only once all are measured
    if args.data is not None:
        data = check_data_root(args.scale, args.data)
    else:
        data = _absolute(os.environ.get("RETRIEVAL_DATA"))
    if scale_config(args.scale).data != "default":
        benchmark_for_scale(args.scale, data)  # full scale: its data set must be there before we start
    out = _absolute(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with _environ(RETRIEVAL_DATA=data, RETRIEVAL_CACHE=cache, RETRIEVAL_SCALE=args.scale):
        if dist_env()["world_size"] > 1:  # torchrun: the extraction is shared; process 0 goes on alone
            with process_group():
                res = offtheshelf(args.scale, data_root=data, device=args.device, cache_dir=cache / "features",
                                  progress=not args.quiet, backbone=backbone)
            if res is None:
                return 0
        else:
            res = offtheshelf(args.scale, data_root=data, device=args.device, cache_dir=cache / "features",
                              progress=not args.quiet, backbone=backbone)
        table = offtheshelf_table(res)
        (out / "offtheshelf.md").write_text(table + "\n")
        (out / "offtheshelf.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
        print(table)
        print(f"\n{extraction_line(res)}; wrote {out / 'offtheshelf.md'}")
        if not only:
            return 0
        docs = run_notebooks(args.scale, out / "notebooks", args.notebooks_dir, only, data, progress=not args.quiet)
    print("\n" + write_results(out, merge_results(out, docs)))
    failed = [d for d in docs if d.get("failed")]
    if failed:
        named = "; ".join(f"{d['notebook']} (In [{d.get('cell')}]: {d['error'][:160]})" for d in failed)
        raise NotebooksFailed(f"{len(failed)} of {len(docs)} notebooks failed, the others ran: {named}. "
                              f"See {out / 'results.md'} and the executed copies under {out / 'notebooks'}")
    return 0
