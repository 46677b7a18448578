"""One run against another (`fusedgru bench --compare OLD.json`), cell by cell, with the
direction in words and a warning where the two runs are not like for like."""

from __future__ import annotations

import math
from typing import Dict, List

from .report import _fmt
from .results import _row_key, _row_label
from .timing import NOISY_SPREAD

# A change smaller than this either way is printed as "same speed" (it rounds to 1.00x).
_SAME = 0.005


def _direction(change: float, than: str = "") -> str:
    """change = old ms / new ms, in words: "2.10x faster", "1.30x slower", "same speed"
    (with ``than``: "2.10x faster than <than>", "the same speed as <than>")."""
    if abs(change - 1) < _SAME:
        return "the same speed as " + than if than else "same speed"
    words = f"{change:.2f}x faster" if change > 1 else f"{1 / change:.2f}x slower"
    return f"{words} than {than}" if than else words


def _threads(meta: dict) -> str:
    t = meta.get("threads")
    return "unknown" if t is None else str(t)


def _mismatches(om: dict, nm: dict) -> List[str]:
    """Warning lines where the two runs differ in what they ran on."""
    lines = []
    if (om.get("device"), om.get("device_name")) != (nm.get("device"), nm.get("device_name")):
        lines.append(f"warning: different devices (old {om.get('device_name')}, new "
                     f"{nm.get('device_name')}): the change mixes machines, not only code")
    ot, nt = _threads(om), _threads(nm)
    if "unknown" in (ot, nt):
        known = [f"the {k} run used {t}" for k, t in (("old", ot), ("new", nt)) if t != "unknown"]
        which = " and ".join(k for k, t in (("old", ot), ("new", nt)) if t == "unknown")
        lines.append(f"warning: CPU thread count of the {which} run unknown (not recorded in "
                     f"{'its file; ' + known[0] if known else 'their files'}): the runs may "
                     "differ in it")
    elif ot != nt:
        lines.append(f"warning: different CPU thread counts (old {ot}, new {nt}): the change "
                     "mixes settings, not only code")
    return lines


def format_comparison(old: dict, new: dict) -> str:
    """new vs old, cell by cell: change = old ms / new ms (above 1: the new run is faster),
    said in words; a summary per provider (geometric mean of the changes)."""
    om, nm = old.get("meta", {}), new.get("meta", {})
    lines = [f"compare: old {om.get('device_name')} {str(om.get('commit'))[:10]} "
             f"{om.get('date')}, {_threads(om)} threads  ->  new {nm.get('device_name')} "
             f"{str(nm.get('commit'))[:10]} {nm.get('date')}, {_threads(nm)} threads"]
    lines += _mismatches(om, nm)
    lines.append("new vs old = old median / new median, in words; noisy: spread above "
                 f"{NOISY_SPREAD:.0%} in either run")
    old_rows = {_row_key(r): r for r in old.get("rows", []) if r.get("status") == "ok"}
    cw = max([44] + [len(_row_label(r)) for r in new.get("rows", [])])
    head = (f"{'case':{cw}} {'provider':12} {'old ms':>9} {'new ms':>9} {'new vs old':>13} "
            f"{'old vs nn':>9} {'new vs nn':>9}")
    lines += [head, "-" * len(head)]
    changes: Dict[str, List[float]] = {}
    noisy = 0
    for r in new.get("rows", []):
        o = old_rows.get(_row_key(r))
        if o is None or r.get("status") != "ok":
            continue
        change = o["median_ms"] / r["median_ms"]
        changes.setdefault(r["provider"], []).append(change)
        spreads = [x.get("spread") or 0 for x in (o, r)]
        noisy += max(spreads) > NOISY_SPREAD
        lines.append(
            f"{_row_label(r):{cw}} {r['provider']:12} {o['median_ms']:9.3f} {r['median_ms']:9.3f} "
            f"{_direction(change):>13} "
            f"{_fmt(o.get('speedup_vs_nn_gru'), '.2f'):>9} "
            f"{_fmt(r.get('speedup_vs_nn_gru'), '.2f'):>9}"
            + ("  noisy" if max(spreads) > NOISY_SPREAD else ""))
    if not changes:
        lines.append("(no cell in common)")
        return "\n".join(lines)
    lines.append("summary (new run vs old, geometric mean over the cells in common):")
    for provider, cs in changes.items():
        lines.append(f"  {provider:11} {_direction(_geomean(cs), 'the old run')} "
                     f"({len(cs)} cells: {sum(c >= 1 + _SAME for c in cs)} faster, "
                     f"{sum(c <= 1 - _SAME for c in cs)} slower)")
    if noisy:
        lines.append(f"  {noisy} of these cells are noisy (spread above {NOISY_SPREAD:.0%} in "
                     "either run): their change is not to be trusted")
    return "\n".join(lines)


def _geomean(xs: List[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))
