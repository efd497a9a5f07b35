"""One sentence that ends a comparison, computed from the run (never typed by hand).

    cmp = paired_comparison(aps_gem, aps_mac)
    display(Markdown(verdict("GeM", "MAC", cmp)))

Taught first in ``02_spoc``; every "X vs. Y" section of the book ends with one.
"""
from __future__ import annotations

__all__ = ["verdict", "signed"]


def signed(x: float) -> str:
    """``+0.012``, or scientific notation when three decimals would print a non-zero gap as 0.000."""
    return f"{x:+.1e}" if x != 0 and abs(x) < 5e-4 else f"{x:+.3f}"


def verdict(name_a: str, name_b: str, cmp: dict, what: str = "mAP") -> str:
    """Markdown: the gap ``name_a - name_b`` from :func:`~retrieval_lib.search.compare.paired_comparison`,
    its interval, the wins/losses/ties, and the conclusion the interval supports."""
    lo, hi = cmp["ci"]
    pct = round(100 * cmp["level"])
    body = (f"**{name_a} vs. {name_b}:** {what} difference {signed(cmp['delta'])} "
            f"({pct} % bootstrap interval over the {cmp['n']} queries {signed(lo)} … {signed(hi)}); "
            f"{name_a} wins {cmp['wins']} queries, loses {cmp['losses']}, ties {cmp['ties']}. ")
    if cmp["significant"]:
        better, worse = (name_a, name_b) if cmp["delta"] > 0 else (name_b, name_a)
        return body + f"On these queries **{better} is better than {worse}**: the interval excludes zero."
    return body + ("**The difference is within the noise** of this query set: the interval contains zero, "
                   "so another draw of queries could reverse it.")
