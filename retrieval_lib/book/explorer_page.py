"""The explorer's page: the widgets of :meth:`Explorer.app <retrieval_lib.book.explorer.Explorer.app>`
and what each control does, and two drivers of the page used by the notebook and the tests.

:class:`ExplorerPage` holds the widgets (collections, folder, uploads, thumbnails, the ``k``,
``p`` and ``L`` sliders, the rows of results with their "why" buttons); the explorer computes.
:func:`measure_redraws` clicks and slides through a page and reports how long each redraw took;
:func:`try_bad_inputs` feeds it bad input on purpose (:func:`huge_png` among it) and collects the
messages shown. Used by ``notebooks/10_explorer.ipynb``.
"""
from __future__ import annotations

import datetime
import html
import io
import statistics
import struct
import time
import zlib
from pathlib import Path
from typing import Optional

from PIL import Image

from retrieval_lib.book.explorer_inputs import (L_MAX, Collection, ExplorerInputError, collection_from_folder,
                                                figure_jpeg)
from retrieval_lib.book.explorer_why import show_why
from retrieval_lib.data.images import ImageError
from retrieval_lib.search.topk import compare_rows

__all__ = ["ExplorerPage", "KMAX", "MAX_THUMBS", "measure_redraws", "huge_png", "try_bad_inputs"]

# ---------------------------------------------------------------------------------- the page
KMAX = 10


MAX_THUMBS = 400


_KIND_STYLE = {"error": "color:#a00000;background:#fff0f0;border:1px solid #e0a0a0",
               "info": "color:#1a4d1a;background:#f0fff0;border:1px solid #a0d0a0"}


def _upload_files(value) -> list:
    """``[(name, bytes)]`` from a FileUpload's value (ipywidgets 8: a tuple of dicts; 7: a dict by name)."""
    if isinstance(value, dict):
        return [(name, bytes(v.get("content", b""))) for name, v in value.items()]
    return [(v.get("name", "upload"), bytes(v.get("content", b""))) for v in (value or ())]


class ExplorerPage:
    """The widgets of :meth:`Explorer.app` and what each control does (the explorer computes)."""

    def __init__(self, ex):
        import ipywidgets as W

        self.ex, self.W = ex, W
        wide = {"description_width": "initial"}
        self.collection = W.Dropdown(options=ex.source_names(), value=None, description="collection (photos searched)",
                                     style=wide, layout=W.Layout(width="460px"))
        self._extra: dict = {}  # dropdown label -> Collection (your folder, your uploads)
        self.folder = W.Text(placeholder="e.g. ~/Pictures/trip (sub-folders = groups)",
                             description="folder (your photos)", style=wide, layout=W.Layout(width="420px"))
        self.load = W.Button(description="load folder", tooltip="search the photos of this folder")
        self.upload = W.FileUpload(accept="image/*", multiple=True, description="upload (photos)")
        self.message = W.HTML()
        self.readout = W.HTML()
        self.query_img = W.Image(format="jpeg", layout=W.Layout(max_width="240px", max_height="240px"))
        self.query_caption = W.HTML()
        self.thumbs = W.GridBox(layout=W.Layout(grid_template_columns="repeat(auto-fill, 108px)", max_height="300px",
                                                overflow="auto", width="100%"))
        self.thumb_buttons: list = []
        self.k = W.IntSlider(value=min(ex.k, KMAX), min=1, max=KMAX, description="k (results per row)",
                             continuous_update=False, style=wide)
        self.p = W.FloatLogSlider(value=ex.p, base=2, min=0, max=4, step=0.25, description="p (GeM exponent)",
                                  continuous_update=False, readout_format=".2f", style=wide)
        self.L = W.IntSlider(value=ex.L, min=1, max=L_MAX, description="L (R-MAC scale levels)", continuous_update=False,
                             style=wide)
        self.view = W.ToggleButtons(options=["every descriptor", "compare two"], description="view (rows shown)",
                                    style=wide)
        methods = ex.methods()
        self.a = W.Dropdown(options=methods, value=methods[0], description="A (first descriptor)", style=wide)
        self.b = W.Dropdown(options=methods, value=methods[2], description="B (second descriptor)", style=wide)
        self.slots = []  # one row of results per descriptor: (box, label, [(image, caption, why button)])
        for s in range(len(methods)):
            label = W.HTML(layout=W.Layout(width="130px"))
            cells = []
            for pos in range(KMAX):
                img = W.Image(format="jpeg", layout=W.Layout(width="112px", height="96px", object_fit="contain"))
                cap = W.HTML()
                why = W.Button(description="why", tooltip="why this result matched", layout=W.Layout(width="112px"))
                why.add_class("explorer-why")
                why.on_click(lambda _b, s=s, pos=pos: self._act("why overlay", lambda: self.open_why(s, pos)))
                cells.append((img, cap, why))
            box = W.HBox([label] + [W.VBox([i, c, w], layout=W.Layout(width="118px")) for i, c, w in cells])
            box.add_class("explorer-row")
            self.slots.append((box, label, cells))
        self.shown: list = []  # (method, TopK) of the rows on the page
        self.why_title = W.HTML()
        self.why_img = W.Image(format="jpeg", layout=W.Layout(max_width="900px"))
        self.why_text = W.HTML()
        self.progress_out = W.Output()
        for w, cls in ((self.message, "explorer-message"), (self.readout, "explorer-readout"),
                       (self.query_img, "explorer-query"), (self.why_img, "explorer-why-image"),
                       (self.why_text, "explorer-why-readout"), (self.load, "explorer-load"),
                       (self.upload, "explorer-upload"), (self.folder, "explorer-folder")):
            w.add_class(cls)
        self.load.on_click(lambda _b: self._act("folder", self.load_folder))
        self.upload.observe(self._on_upload, names="value")
        self.collection.observe(self._on_collection, names="value")
        for w, what in ((self.k, "k slider"), (self.p, "p slider"), (self.L, "L slider"), (self.view, "view"),
                        (self.a, "compare A"), (self.b, "compare B")):
            w.observe(lambda ch, what=what: self._act(what, self._on_setting), names="value")
        self.root = W.VBox([
            W.HTML("<h3>Explore your photos</h3>"),
            W.HBox([self.collection, self.upload]), W.HBox([self.folder, self.load]),
            self.message, self.progress_out,
            W.HBox([W.VBox([W.HTML("<b>query</b>"), self.query_img, self.query_caption],
                           layout=W.Layout(width="260px")),
                    W.VBox([W.HTML("<b>the collection</b>: click the button under a photo to query with it"),
                            self.thumbs], layout=W.Layout(flex="1"))]),
            W.HBox([self.k, self.p, self.L]), W.HBox([self.view, self.a, self.b]),
            self.readout, W.VBox([s[0] for s in self.slots]),
            self.why_title, self.why_img, self.why_text])
        self.root.add_class("explorer")
        self._quiet = True
        self._add_option(ex.collection, ex.collection_label)
        self._quiet = False
        self.show_collection()
        self.redraw("page")

    # -- messages and timing
    def say(self, text: str, kind: str = "info") -> None:
        self.ex.messages.append((kind, text))
        self.message.value = (f"<div class='explorer-{kind}' style='{_KIND_STYLE[kind]};padding:4px 8px;"
                              f"border-radius:4px'>{html.escape(text)}</div>") if text else ""

    def _act(self, what: str, fn) -> Optional[float]:
        """Run one user action: time it, say what went wrong in the page instead of raising."""
        if self._quiet:
            return None
        self.message.value = ""
        n_msgs = len(self.ex.messages)
        t0 = time.perf_counter()
        failed = None
        with self.progress_out:  # progress bars of an extraction go here (an Output swallows exceptions: catch inside)
            try:
                fn()
            except (ExplorerInputError, ImageError) as err:
                failed = str(err)
            except Exception as err:  # a bug, but the page stays usable and says what happened
                failed = f"{what} failed: {type(err).__name__}: {err}"
        if failed is not None:
            if self.progress_out.outputs:
                self.progress_out.clear_output()
            self.say(failed, "error")
            return None
        dt = time.perf_counter() - t0
        self.ex.record(what, dt)
        if self.progress_out.outputs:  # (clear_output outside a kernel would print to the terminal)
            self.progress_out.clear_output()
        if len(self.ex.messages) > n_msgs and not self.message.value:
            kind, text = self.ex.messages[-1]
            self.say(text, kind)
            self.ex.messages.pop()  # said once, not twice
        self.readout.value = (f"<span class='explorer-timing'>{what}: redrawn in {dt:.3f} s</span> · query "
                              f"'{self.ex.query.name}' · {self.ex.collection.summary()}")
        return dt

    # -- collections
    def _add_option(self, col: Collection, label: Optional[str] = None) -> None:
        if label is not None and label not in self.ex.sources:
            self._extra[label] = col
        options = list(self.ex.source_names()) + list(self._extra)
        current = label or self._current_label
        self.collection.options = options
        self.collection.value = current if current in options else options[0]

    @property
    def _current_label(self) -> Optional[str]:
        label = self.collection.value
        if label is None:  # the first build: the explorer's collection came from its first source
            return self.ex.source_names()[0] if self.ex.source_names() else None
        return label

    def _on_collection(self, change) -> None:
        if self._quiet or change["new"] is None:
            return

        def switch():
            label = change["new"]
            self.ex.use_collection(self._extra.get(label, label))
            self.show_collection()
            self.redraw_rows()
            notes = self.ex.collection.notes
            if notes:
                self.say("; ".join(notes), "info")

        self._act("collection", switch)

    def load_folder(self) -> None:
        col = collection_from_folder(self.folder.value, progress=self.ex.progress)
        self.ex.use_collection(col)
        self._quiet = True
        try:
            self._add_option(col, f"your folder: {col.name}")
        finally:
            self._quiet = False
        self.show_collection()
        self.redraw_rows()
        if col.notes:
            self.say("; ".join(col.notes), "info")

    def _on_upload(self, change) -> None:
        files = _upload_files(change["new"])
        if not files or self._quiet:
            return

        def take():
            errors, done = [], []
            for name, content in files:
                try:
                    self.ex.add_upload(name, content)
                    done.append(name)
                except ExplorerInputError as err:
                    errors.append(str(err))
            if len(self.ex.uploads) >= 2:
                self._quiet = True
                try:
                    current = self.collection.value
                    self._extra = {k: v for k, v in self._extra.items() if not k.startswith("your uploads")}
                    self._add_option(self.ex.uploads_collection(), "your uploads")
                    self.collection.value = current if current in self.collection.options else self.collection.value
                finally:
                    self._quiet = False
            if done:
                self.show_query()
                self.redraw_rows()
            if errors:
                raise ExplorerInputError(" | ".join(errors) + (f" (used: {', '.join(done)})" if done else ""))

        self._act("upload", take)
        try:  # let the same file be chosen again
            self._quiet = True
            self.upload.value = ()
        except Exception:  # ipywidgets 7 keeps its value: harmless
            pass
        finally:
            self._quiet = False

    # -- drawing
    def show_collection(self) -> None:
        W, ex = self.W, self.ex
        n = len(ex.collection)
        self.thumb_buttons = []
        items = []
        for i in range(min(n, MAX_THUMBS)):
            b = W.Button(description=f"#{i}", tooltip=Path(ex.collection.paths[i]).name, layout=W.Layout(width="100px"))
            b.add_class("explorer-thumb")
            b.on_click(lambda _b, i=i: self._act("click thumbnail", lambda: self.pick(i)))
            self.thumb_buttons.append(b)
            items.append(W.VBox([W.Image(value=ex.thumbnail(i), format="jpeg",
                                         layout=W.Layout(width="100px", height="84px", object_fit="contain")), b]))
        for old in self.thumbs.children:
            old.close()
        self.thumbs.children = items
        if n > MAX_THUMBS:
            self.say(f"{n} photos: the first {MAX_THUMBS} are shown as thumbnails (all {n} are searched)", "info")
        self.show_query()

    def pick(self, i: int) -> None:
        self.ex.set_query(i)
        self.show_query()
        self.redraw_rows()

    def show_query(self) -> None:
        q = self.ex.query
        self.query_img.value = self.ex.query_thumbnail(240)
        where = f"#{q.index} of {self.ex.collection.name}" if q.index is not None else "uploaded"
        group = self.ex.collection.group(q.index) if q.index is not None else None
        self.query_caption.value = (f"<span class='explorer-query-name'>{q.name}</span><br><small>{where}"
                                    + (f", group {group}" if group else "") + "</small>")

    def _on_setting(self) -> None:
        ex = self.ex
        ex.k, ex.p, ex.L = int(self.k.value), float(self.p.value), int(self.L.value)
        compare = self.view.value == "compare two"
        self.a.layout.display = self.b.layout.display = "" if compare else "none"
        self.redraw_rows()

    def redraw(self, what: str) -> None:
        self._quiet = False
        self._act(what, self._on_setting)

    def redraw_rows(self) -> None:
        ex = self.ex
        compare = self.view.value == "compare two"
        methods = [self.a.value, self.b.value] if compare else ex.methods()
        rows = ex.rows(methods)
        cmp = compare_rows(rows[0].indices, rows[1].indices) if compare and len(rows) == 2 else None
        self.shown = list(zip(methods, rows))
        for s, (box, label, cells) in enumerate(self.slots):
            if s >= len(rows):
                box.layout.display = "none"
                continue
            box.layout.display = ""
            method, row = methods[s], rows[s]
            tag = ("A: " if s == 0 else "B: ") if compare else ""
            label.value = f"<b class='explorer-row-label'>{html.escape(tag + row.label)}</b>"
            for pos, (img, cap, why) in enumerate(cells):
                if pos >= len(row.indices):
                    img.layout.display = cap.layout.display = why.layout.display = "none"
                    continue
                img.layout.display = cap.layout.display = ""
                why.layout.display = "" if ex.explains(method) else "none"
                i = row.indices[pos]
                img.value = ex.thumbnail(i)
                ok = ex.correct(i)
                img.layout.border = {True: "4px solid #2ca02c", False: "4px solid #d62728"}.get(ok, "4px solid #bbbbbb")
                other = ""
                if cmp is not None:
                    r = (cmp.rank_in_b if s == 0 else cmp.rank_in_a)[pos]
                    other = (f" · {'B' if s == 0 else 'A'}: #{r + 1}" if r is not None
                             else f" · <b>only {'A' if s == 0 else 'B'}</b>")
                cap.value = (f"<span class='explorer-score'>#{pos + 1} s={row.scores[pos]:.3f}</span>{other}<br>"
                             f"<small>#{i} {html.escape(Path(ex.collection.paths[i]).name[:18])}</small>")
        if cmp is not None:
            self.why_title.value = ""
            summary = (f"A = {rows[0].label} and B = {rows[1].label} share {cmp.shared} of their top {len(rows[0].indices)}"
                       + (" in the same order" if cmp.same_order else "")
                       + (f"; only in A: {', '.join(f'#{i}' for i in cmp.only_a)}" if cmp.only_a else "")
                       + (f"; only in B: {', '.join(f'#{i}' for i in cmp.only_b)}" if cmp.only_b else ""))
            self.why_text.value = f"<span class='explorer-compare'>{html.escape(summary)}</span>"

    def open_why(self, slot: int, pos: int) -> None:
        method, row = self.shown[slot]
        fig, text = show_why(self.ex, method, row.indices[pos], row.scores[pos])
        self.why_img.value = figure_jpeg(fig)
        self.why_title.value = f"<h4>why result #{pos + 1} of {html.escape(row.label)} matched</h4>"
        self.why_text.value = f"<span class='explorer-why-text'>{html.escape(text)}</span>"


def measure_redraws(ex, repeats: int = 3) -> dict:
    """Drive the page's controls as a user would and return the median seconds of each kind of redraw.

    Drives a page of its own (closed at the end); the explorer's query and settings change, so pass
    :meth:`Explorer.clone` to leave a page on screen as it is. Keys: ``click_thumbnail``, ``p_slider``,
    ``L_slider``, ``k_slider``, ``compare``, ``why_mac``, ``why_gem``, ``why_rmac`` (median of
    ``repeats`` redraws each; every slider move goes to a value not seen before, so it re-pools
    every kept map). A redraw that failed is missing from the dict.
    """
    on_screen = ex.page
    ex.app()  # a page of its own, on the explorer's collection, closed at the end
    page = ex.page
    n = len(ex.collection)
    times: dict = {}

    def timed(key, action):
        before = len(ex.timings)
        action()
        if len(ex.timings) > before:
            times.setdefault(key, []).append(ex.timings[-1][1])

    page.view.value = "every descriptor"
    for r in range(repeats):
        timed("click_thumbnail", page.thumb_buttons[(r + 1) % min(n, len(page.thumb_buttons))].click)
    ps = [v for v in (2.0 ** (e / 4) for e in range(0, 17)) if all(abs(v - kept) > 1e-9 for kept in ex.kept_p_values())]
    for v in ps[1:repeats + 1]:
        timed("p_slider", lambda v=v: setattr(page.p, "value", v))
    for v in [L for L in (1, 2, 4, 5, 3) if L != page.L.value][:repeats]:
        timed("L_slider", lambda v=v: setattr(page.L, "value", v))
    for v in [k for k in (3, 8, 5, 6) if k != page.k.value][:repeats]:
        timed("k_slider", lambda v=v: setattr(page.k, "value", v))
    for slot, key in ((0, "why_mac"), (2, "why_gem"), (3, "why_rmac")):
        for r in range(repeats):
            timed(key, page.slots[slot][2][r % len(page.shown[slot][1].indices)][2].click)
    timed("compare", lambda: setattr(page.view, "value", "compare two"))
    for m in ex.methods()[1:repeats]:
        timed("compare", lambda m=m: setattr(page.b, "value", m))
    page.view.value = "every descriptor"
    ex.close_page()
    ex.page = on_screen
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------- bad input, on purpose
def huge_png(width: int = 10_000, height: int = 9_000) -> bytes:
    """The bytes of a PNG that says it is ``width x height`` px, in a few dozen bytes (its header is
    rewritten, its pixels are not there): what a huge photo looks like to the explorer before decoding."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", int(width), int(height))  # IHDR: width, height (after the 8-byte signature,
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)  # length and type), then its CRC
    return bytes(b)


def try_bad_inputs(ex, folder, photo: Optional[str] = None) -> list:
    """Feed the page every kind of bad input through its own controls; return ``[(case, kind, message)]``.

    Under ``folder`` (created) it writes: an empty folder, a folder of one photo, a folder with
    duplicate files, and it names a folder that does not exist (typed into the folder box, then
    "load folder"); it uploads a text file, a truncated JPEG and a huge photo (:func:`huge_png`)
    through the upload control of a page of its own (closed at the end; the explorer's collection
    and query change meanwhile, so pass :meth:`Explorer.clone` to leave a page on screen as it is).
    ``photo`` (default: the collection's first) is the photo copied
    into the folders. ``kind`` is ``"error"`` (refused) or ``"info"`` (used, with a note). The
    collection in use before is chosen again at the end.
    """
    on_screen = ex.page
    ex.app()  # a page of its own, closed at the end
    page = ex.page
    root = Path(folder)
    photo = Path(photo or ex.collection.paths[0])
    cases = {"empty": [], "one": [photo], "dupes": [photo, photo, Path(ex.collection.paths[-1])]}
    for name, files in cases.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for n, f in enumerate(files):
            (d / f"photo{n}{f.suffix}").write_bytes(f.read_bytes())
    jpeg = io.BytesIO()
    Image.open(photo).convert("RGB").save(jpeg, format="JPEG", quality=90)
    before_label = page.collection.value
    said = []

    def last_message(case, action):
        n = len(ex.messages)
        action()
        kind, text = ex.messages[-1] if len(ex.messages) > n else ("none", "")
        shown = bool(text) and html.escape(text) in page.message.value
        said.append((case, kind if shown else f"{kind}, not shown", text))

    for case, path in (("folder that does not exist", root / "nowhere"), ("empty folder", root / "empty"),
                       ("folder of one photo", root / "one"), ("duplicate files", root / "dupes")):
        page.folder.value = str(path)
        last_message(case, page.load.click)
    for case, name, content in (("not an image", "notes.txt", b"these are my holiday notes, not a photo"),
                                ("unreadable photo", "broken.jpg", jpeg.getvalue()[:400]),
                                ("huge photo", "huge.png", huge_png())):
        item = {"name": name, "type": "", "size": len(content), "content": memoryview(content),
                "last_modified": datetime.datetime.now(datetime.timezone.utc)}
        last_message(case, lambda item=item: setattr(page.upload, "value", (item,)))
    if page.collection.value != before_label:
        page.collection.value = before_label
    ex.close_page()
    ex.page = on_screen
    return said
