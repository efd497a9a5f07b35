"""One sentence that ends a comparison, computed from the run (never typed by hand).

    from retrieval_lib import paired_comparison, verdict
    cmp = paired_comparison(aps_gem, aps_mac)
    display(Markdown(verdict("GeM", "MAC", cmp)))

Pure text over :func:`~retrieval_lib.search.compare.paired_comparison`'s dict, so it sits on the
search floor beside it. Taught first in ``02_spoc``; every "X vs. Y" section of the book ends with one.
"""
from __future__ import annotations

__all__ = ["verdict", "signed", "multiplicity_note"]


def signed(x: float) -> str:
    """``+0.012``, or scientific notation when three decimals would print a non-zero gap as 0.000."""
    return f"{x:+.1e}" if x != 0 and abs(x) < 5e-4 else f"{x:+.3f}"


def verdict(name_a: str, name_b: str, cmp: dict, what: str = "mAP") -> str:
    """Markdown: the gap ``name_a - name_b`` from :func:`~retrieval_lib.search.compare.paired_comparison`,
    its interval, the wins/losses/ties, and the conclusion the comparison supports.

    Four cases, never a claim the data cannot make: *identical* results (every per-query
    difference 0) say so and test nothing; an interval that excludes 0 names the better one;
    a *one-sided* result (every query that moved favours the same side) cannot reverse under
    any resample, so it reports the sign test instead of "could reverse"; otherwise the gap is
    within the noise and another draw of queries (or groups) could reverse it.
    """
    n = cmp["n"]
    if cmp.get("identical", cmp.get("wins", 1) == 0 and cmp.get("losses", 1) == 0):
        return (f"**{name_a} vs. {name_b}:** identical {what} on every one of the {n} queries (each query's "
                "difference is 0): there is no difference to test.")
    lo, hi = cmp["ci"]
    pct = round(100 * cmp["level"])
    over = f"the {cmp['n_groups']} groups" if cmp.get("resampled") == "groups" else f"the {n} queries"
    body = (f"**{name_a} vs. {name_b}:** {what} difference {signed(cmp['delta'])} "
            f"({pct} % bootstrap interval over {over} {signed(lo)} … {signed(hi)}); "
            f"{name_a} wins {cmp['wins']} queries, loses {cmp['losses']}, ties {cmp['ties']}. ")
    if cmp["significant"]:
        better, worse = (name_a, name_b) if cmp["delta"] > 0 else (name_b, name_a)
        return body + f"On these queries **{better} is better than {worse}**: the interval excludes zero."
    if cmp["wins"] == 0 or cmp["losses"] == 0:
        leader = name_a if cmp["losses"] == 0 else name_b
        moved = cmp["wins"] + cmp["losses"]
        p = cmp.get("sign_p")
        test = "" if p is None else f" Sign test on the {moved} queries that moved: p = {p:.2g}"
        reading = ("" if p is None else
                   " — the direction is unlikely to be chance, its size is not pinned down." if p < 1 - cmp["level"]
                   else " — too few queries moved to rule out chance.")
        return body + (f"Every query that moved favours **{leader}**, so no resample can reverse the sign; the "
                       f"interval reaches zero only through resamples that leave those {moved} queries out."
                       + test + reading)
    drawn = "groups" if cmp.get("resampled") == "groups" else "queries"
    return body + ("**The difference is within the noise** of this query set: the interval contains zero, "
                   f"so another draw of {drawn} could reverse it.")


def multiplicity_note(k: int, level: float = 0.95) -> str:
    """One sentence for a section that makes ``k`` comparisons at once."""
    return (f"*{k} comparisons at once:* even with no real difference anywhere, about {k * (1 - level):.1f} of "
            f"{k} intervals at {round(100 * level)} % would exclude zero by chance, so a single 'better' among "
            "them is weak evidence on its own (Holm's adjustment, `search.compare.holm`, accounts for it).")
