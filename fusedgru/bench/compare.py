"""One run against another (`fusedgru bench --compare OLD.json`), cell by cell."""

from __future__ import annotations

from .report import _fmt
from .results import _row_key


def format_comparison(old: dict, new: dict) -> str:
    """new vs old, cell by cell: change = old ms / new ms (above 1: faster now)."""
    om, nm = old.get("meta", {}), new.get("meta", {})
    lines = [f"compare: old {om.get('device_name')} {str(om.get('commit'))[:10]} "
             f"{om.get('date')}  ->  new {nm.get('device_name')} "
             f"{str(nm.get('commit'))[:10]} {nm.get('date')}"]
    if om.get("device_name") != nm.get("device_name"):
        lines.append("warning: different devices: the change mixes machines")
    old_rows = {_row_key(r): r for r in old.get("rows", []) if r.get("status") == "ok"}
    head = (f"{'case':44} {'provider':11} {'old ms':>9} {'new ms':>9} {'change':>8} "
            f"{'old vs nn':>9} {'new vs nn':>9}")
    lines += [head, "-" * len(head)]
    n = 0
    for r in new.get("rows", []):
        o = old_rows.get(_row_key(r))
        if o is None or r.get("status") != "ok":
            continue
        n += 1
        case = (f"{r['mode']} {r['dtype']} B={r['B']} H={r['H']} T={r['T']}"
                + (f" L={r['layers']}" if r["layers"] != 1 else "")
                + (" bi" if r["bidirectional"] else ""))
        lines.append(
            f"{case:44} {r['provider']:11} {o['median_ms']:9.3f} {r['median_ms']:9.3f} "
            f"{o['median_ms'] / r['median_ms']:7.2f}x "
            f"{_fmt(o.get('speedup_vs_nn_gru'), '.2f'):>9} "
            f"{_fmt(r.get('speedup_vs_nn_gru'), '.2f'):>9}")
    if n == 0:
        lines.append("(no cell in common)")
    return "\n".join(lines)
