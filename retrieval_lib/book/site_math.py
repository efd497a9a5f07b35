"""Equations of the notebooks' markdown as MathML, converted when the site is built (no network, no script).

JupyterLab and Colab typeset ``$...$`` and ``$$...$$`` with MathJax in the browser; a static
page opened offline has no MathJax, so :mod:`retrieval_lib.book.site` converts every equation
to MathML, which browsers draw natively. The notebooks' sources are not touched.

- :func:`split_math` cuts markdown into text, inline and display math the way Jupyter reads
  it: nothing inside code fences or code spans is math, ``\\$`` is a dollar sign, an inline
  ``$`` opens only before a non-space and closes only after one, and math never spans a
  blank line.
- :func:`latex_to_mathml` converts one equation with ``latex2mathml``, after rewriting the
  few macros it leaves as text (``\\lVert``/``\\rVert`` after ``\\bigl``/``\\bigr``, ``\\arg``,
  ``\\operatorname`` of more than letters), and turns bold Greek into the Unicode
  mathematical letters (Chromium's MathML ignores ``mathvariant="bold"``).
- :func:`math_placeholders` swaps each equation of a markdown text for a placeholder word
  that markdown leaves alone; :func:`put_math_back` puts the MathML in its place in the
  rendered HTML (and plain text inside tag attributes, e.g. a heading's anchor).
"""
from __future__ import annotations

import html
import re
import unicodedata

from latex2mathml.converter import convert

__all__ = ["split_math", "latex_to_mathml", "math_placeholders", "put_math_back", "plain_math", "MathError"]


class MathError(ValueError):
    """An equation that could not be converted (the macro latex2mathml left as text is named)."""


_FENCE = re.compile(r"[ ]{0,3}(`{3,}|~{3,})")


def split_math(text: str) -> list[tuple[str, str]]:
    """``[(kind, content)]`` with kind ``"text"``, ``"inline"`` or ``"display"`` (content without the ``$``).

    Joining the pieces back, with ``$``/``$$`` around the math, gives ``text`` again.
    """
    out: list[tuple[str, str]] = []
    buf: list[str] = []
    i, n = 0, len(text)

    def flush():
        if buf:
            out.append(("text", "".join(buf)))
            buf.clear()

    while i < n:
        ch = text[i]
        if i == 0 or text[i - 1] == "\n":  # a code fence: everything up to its closing fence is text
            m = _FENCE.match(text, i)
            if m:
                fence = m.group(1)
                close = re.compile(r"^[ ]{0,3}" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}[ \t]*$", re.M)
                line_end = text.find("\n", i)
                end_m = close.search(text, line_end + 1) if line_end >= 0 else None
                end = n if end_m is None else end_m.end()
                buf.append(text[i:end])
                i = end
                continue
        if ch == "\\" and i + 1 < n:  # an escaped character (\$ is a dollar sign)
            buf.append(text[i:i + 2])
            i += 2
            continue
        if ch == "`":  # a code span: a run of backticks up to the next run of the same length
            run = len(text[i:]) - len(text[i:].lstrip("`"))
            m = re.compile(r"(?<!`)" + "`" * run + r"(?!`)").search(text, i + run)
            end = i + run if m is None else m.end()
            buf.append(text[i:end])
            i = end
            continue
        if ch == "$":
            if text.startswith("$$", i):
                end = _closing(text, i + 2, "$$")
                if end is not None:
                    flush()
                    out.append(("display", text[i + 2:end]))
                    i = end + 2
                    continue
                buf.append("$$")
                i += 2
                continue
            if i + 1 < n and not text[i + 1].isspace():
                end = _closing(text, i + 1, "$")
                if end is not None and not text[end - 1].isspace() and not text[end + 1:end + 2].isdigit():
                    flush()
                    out.append(("inline", text[i + 1:end]))
                    i = end + 1
                    continue
            buf.append(ch)
            i += 1
            continue
        buf.append(ch)
        i += 1
    flush()
    return out


def _closing(text: str, start: int, delim: str) -> int | None:
    """Where the math opened before ``start`` closes (index of ``delim``), or None: not before a blank line."""
    i = start
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text.startswith("\n\n", i) or re.match(r"\n[ \t]*\n", text[i:i + 80] or ""):
            return None
        if text.startswith(delim, i):
            if delim == "$" and text.startswith("$$", i):  # `$a$$b$`: not an inline close
                return None
            return i
        i += 1
    return None


# ---------------------------------------------------------------- one equation
_SIZED = r"\\(?:big|Big|bigg|Bigg)[lrm]?"
_REWRITES = [
    (re.compile(_SIZED + r"\s*(\\lVert|\\rVert|\\\||\\lvert|\\rvert|\|)"), r"\1"),  # a sized norm bar: plain bar
    (re.compile(r"\\[lr]Vert\b"), r"\\|"),
    (re.compile(r"\\[lr]vert\b"), r"|"),
    (re.compile(r"\\arg\b"), r"\\operatorname{arg}"),
]
_OPERATORNAME = re.compile(r"\\operatorname\s*\{([^{}]*)\}")


def _rewrite(tex: str) -> str:
    for pattern, repl in _REWRITES:
        tex = pattern.sub(repl, tex)
    # \operatorname{...} with anything but letters in it (e.g. arg\,max) comes out empty: write it upright instead
    return _OPERATORNAME.sub(lambda m: m.group(0) if re.fullmatch(r"[A-Za-z]+", m.group(1).strip())
                             else r"\mathrm{" + m.group(1) + "}", tex)


_VARIANT_WORDS = {"bold": "BOLD", "bold-italic": "BOLD ITALIC", "italic": "ITALIC", "double-struck": "DOUBLE-STRUCK",
                  "script": "SCRIPT", "fraktur": "FRAKTUR", "sans-serif": "SANS-SERIF", "monospace": "MONOSPACE"}
_MI = re.compile(r'<(mi|mn|mo|mtext) mathvariant="([a-z-]+)">([^<]*)</\1>')


def _styled(ch: str, words: str) -> str | None:
    """``ch`` as a Unicode mathematical letter of the style ``words`` (e.g. "BOLD"), or None if none exists."""
    try:
        name = unicodedata.name(ch)
    except ValueError:
        return None
    for prefix, kind in (("LATIN CAPITAL LETTER ", "CAPITAL "), ("LATIN SMALL LETTER ", "SMALL "),
                         ("GREEK CAPITAL LETTER ", "CAPITAL "), ("GREEK SMALL LETTER ", "SMALL "), ("DIGIT ", "DIGIT ")):
        if name.startswith(prefix):
            try:
                return unicodedata.lookup(f"MATHEMATICAL {words} {kind}{name[len(prefix):]}")
            except KeyError:
                return None
    return None


def _unicode_variants(mathml: str) -> str:
    """``<mi mathvariant="bold">Λ</mi>`` -> ``<mi>𝚲</mi>``: MathML Core (Chromium) draws only ``normal``."""
    def one(m):
        tag, variant, body = m.groups()
        words = _VARIANT_WORDS.get(variant)
        chars = html.unescape(body)
        styled = [_styled(c, words) if words else None for c in chars]
        if words is None or not chars or any(s is None for s in styled):
            return m.group(0)
        return f"<{tag}>{''.join(styled)}</{tag}>"

    return _MI.sub(one, mathml)


def _visible_text(mathml: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", mathml))


def latex_to_mathml(tex: str, display: bool = False) -> str:
    """One equation (without its ``$``) as a ``<math>`` element.

    Raises:
        MathError: the equation does not parse, or a macro would be shown as text.
    """
    try:
        mathml = convert(_rewrite(tex.strip()), display="block" if display else "inline")
    except Exception as err:  # latex2mathml raises its own exception types
        raise MathError(f"the equation {tex.strip()[:120]!r} does not convert: {type(err).__name__}: {err}") from err
    left = [m for seg in re.findall(r">([^<]+)<", mathml) for m in re.findall(r"\\[A-Za-z]+|\\.", html.unescape(seg))]
    if left:
        raise MathError(f"the equation {tex.strip()[:120]!r} would show {', '.join(sorted(set(left)))} as text; "
                        "write it with another macro or add a rewrite to retrieval_lib/book/site_math.py")
    return _accents(_unicode_variants(mathml))


def _accents(mathml: str) -> str:
    """The hat as U+02C6, which Chromium sets on its letter (the ASCII ``^`` floats above and to the left)."""
    return mathml.replace("<mo>&#x0005E;</mo></mover>", "<mo>&#x002C6;</mo></mover>")


def plain_math(tex: str) -> str:
    """Equation text for places that take no markup (a tag attribute, a page title): its visible characters."""
    try:
        return _visible_text(latex_to_mathml(tex))
    except MathError:
        return re.sub(r"\\[A-Za-z]+|[{}\\^_$]", "", tex)


# ---------------------------------------------------------------- markdown around the equations
_TOKEN = "rlmath{}x"
_TOKEN_RE = re.compile(r"rlmath(\d+)x")


def math_placeholders(text: str, table: list) -> str:
    """``text`` with each equation replaced by a placeholder word; ``table`` gets ``(kind, tex)`` per equation.

    The placeholder is a lower-case word markdown leaves as it is; its number indexes ``table``,
    shared across the cells of a page so that one :func:`put_math_back` restores them all.
    """
    parts = []
    for kind, content in split_math(text):
        if kind == "text":
            parts.append(content)
            continue
        table.append((kind, content))
        token = _TOKEN.format(len(table) - 1)
        parts.append(token)  # a display equation stays where it is (a list item keeps it); <math display="block"> breaks the line
    return "".join(parts)


def put_math_back(page: str, table: list) -> tuple[str, list]:
    """Replace the placeholders of ``page`` (HTML) with MathML; returns ``(page, failures)``.

    Inside a tag (an attribute such as a heading's ``id``) a placeholder becomes the
    equation's plain text. An equation that cannot be converted is shown as its source in a
    ``<code class="rl-tex-error">`` and listed in ``failures`` as ``(tex, message)``.
    """
    failures = []
    cache: dict = {}

    def mathml(k: int) -> str:
        if k not in cache:
            kind, tex = table[k]
            try:
                cache[k] = latex_to_mathml(tex, display=kind == "display")
            except MathError as err:
                failures.append((tex, str(err)))
                cache[k] = f'<code class="rl-tex-error" title="not converted">{html.escape(tex)}</code>'
        return cache[k]

    def swap(m):
        whole = m.group(0)
        if whole.startswith("<"):
            return _TOKEN_RE.sub(lambda t: html.escape(plain_math(table[int(t.group(1))][1])), whole)
        return mathml(int(m.group(1)))

    return re.sub(r"<[^>]*>|rlmath(\d+)x", swap, page), failures
