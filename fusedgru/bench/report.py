"""What a run prints and draws: the speed-up table, the warning about noisy timings, the
training-memory table and speedup.png (speed-up vs batch size, one line per hidden size and
backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Sequence

from .grids import is_train
from .providers import BASELINE
from .results import _KEY, _mem, _row_label
from .timing import NOISY_SPREAD


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _mib(b) -> Optional[float]:
    return None if b is None else b / 2 ** 20


def _pct(fraction: Optional[float]) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def format_table(rows: Sequence[dict], device_type: str = "cuda") -> str:
    mem_head = "peak MiB" if device_type == "cuda" else "saved MiB"
    # packed and rollout cells: their length distribution (and packing) in a column
    seq = any(r.get("lengths") for r in rows)
    gw = max([6] + [len(r["grid"]) for r in rows])
    head = (f"{'grid':{gw}} {'mode':9} {'dtype':8} {'B':>4} {'H':>5} {'T':>5} {'LxD':>4} "
            + (f"{'lengths':18} " if seq else "") + f"{'provider':12} {'median ms':>10} {'spread':>7} {'us/step':>9} {'vs nn.GRU':>9} "
            f"{mem_head:>9} {'mem/nn':>6}  check")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] == "skipped":
            continue
        if r["status"] == "ok":
            chk = f"ok {r['check']['worst_ratio']:.2f}" if r.get("check") else "ok"
        else:
            chk = f"{r['status']}: {r['reason']}"[:70]
        speed = _fmt(r["speedup_vs_nn_gru"], ".2f")
        lines.append(
            f"{r['grid']:{gw}} {r['mode']:9} {r['dtype']:8} {r['B']:>4} {r['H']:>5} {r['T']:>5} "
            f"{str(r['layers']) + 'x' + ('2' if r['bidirectional'] else '1'):>4} "
            + (f"{(r.get('lengths') or '') + (' ' + r['packing'] if r.get('packing') else ''):18} "
               if seq else "")
            + f"{r['provider']:12} {_fmt(r['median_ms'], '.3f'):>10} {_pct(r.get('spread')):>7} "
            f"{_fmt(r['us_per_step'], '.1f'):>9} {speed + ('x' if speed != '-' else ''):>9} "
            f"{_fmt(_mib(_mem(r)), '.1f'):>9} {_fmt(r['mem_vs_nn_gru'], '.2f'):>6}  {chk}")
    return "\n".join(lines)


def format_noise_warning(rows: Sequence[dict]) -> Optional[str]:
    """One line naming every timing whose spread (IQR / median) is above NOISY_SPREAD, or
    None when there is none."""
    noisy = [r for r in rows if r["status"] == "ok" and (r.get("spread") or 0) > NOISY_SPREAD]
    if not noisy:
        return None
    return (f"warning: {len(noisy)} timings too noisy to trust (spread = IQR / median above "
            f"{NOISY_SPREAD:.0%}; rerun them, e.g. with --threads 1 on a quiet machine): "
            + "; ".join(f"{r['grid']} {_row_label(r)} {r['provider']} {_pct(r['spread'])}"
                        for r in noisy))


def format_peer_table(rows: Sequence[dict]) -> str:
    """Cells with peer ways beside nn.GRU (rollout cells): every provider against the
    fastest of nn.GRU's ways and TorchRL's, and against each of them.  "" when none."""
    sel = [r for r in rows if r["status"] == "ok" and r.get("speedup_vs")]
    if not sel:
        return ""
    peers = list(dict.fromkeys(p for r in sel for p in r["speedup_vs"]))
    cw = max(len(r["grid"] + " " + _row_label(r)) for r in sel)
    head = (f"{'cell':{cw}} {'provider':12} {'median ms':>10} {'vs best':>8} {'best':12} "
            + " ".join(f"{p:>12}" for p in peers))
    lines = ["against every way of running nn.GRU and TorchRL on the same rollouts (peer "
             "median / provider median; above 1: faster; best: the fastest peer)",
             head, "-" * len(head)]
    for r in sel:
        lines.append(
            f"{r['grid'] + ' ' + _row_label(r):{cw}} {r['provider']:12} "
            f"{r['median_ms']:>10.3f} {_fmt(r['speedup_vs_best'], '.2f') + 'x':>8} "
            f"{r['best_peer']:12} "
            + " ".join(f"{_fmt(r['speedup_vs'].get(p), '.2f') + 'x':>12}" for p in peers))
    return "\n".join(lines)


def format_memory_table(rows: Sequence[dict]) -> str:
    """Training memory of each provider beside nn.GRU on the same cell."""
    train = [r for r in rows if is_train(r["mode"]) and r["status"] == "ok"]
    if not train:
        return ""
    base = {tuple(r[k] for k in _KEY): r for r in train if r["provider"] == BASELINE}
    gw = max([6] + [len(r["grid"]) for r in train])
    head = (f"{'grid':{gw}} {'dtype':8} {'B':>4} {'H':>5} {'T':>5} {'provider':12} "
            f"{'peak MiB':>9} {'nn.GRU':>9} {'saved MiB':>9} {'nn.GRU':>9}")
    lines = ["training memory vs nn.GRU (peak: GPU allocator during one forward+backward; "
             "saved: activations kept for the backward)", head, "-" * len(head)]
    for r in train:
        if r["provider"] == BASELINE:
            continue
        b = base.get(tuple(r[k] for k in _KEY))
        lines.append(
            f"{r['grid']:{gw}} {r['dtype']:8} {r['B']:>4} {r['H']:>5} {r['T']:>5} "
            f"{r['provider']:12} {_fmt(_mib(r['peak_mem_bytes']), '.1f'):>9} "
            f"{_fmt(_mib(b and b['peak_mem_bytes']), '.1f'):>9} "
            f"{_fmt(_mib(r['saved_bytes']), '.2f'):>9} "
            f"{_fmt(_mib(b and b['saved_bytes']), '.2f'):>9}")
    return "\n".join(lines)


def import_pyplot():
    """(matplotlib.pyplot on the Agg backend, None), or (None, why there is no plot):
    matplotlib is optional (the "bench" extra), and a run without it still writes its JSON."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return None, f"matplotlib is not installed ({type(exc).__name__}): no PNG"
    return plt, None


def write_plot(rows: Sequence[dict], meta: dict, path: Path) -> Optional[str]:
    """speed-up vs batch size, one line per (backend, hidden size), one panel per
    (grid, mode, dtype).  Returns why no plot was written, or None."""
    plt, why = import_pyplot()
    if plt is None:
        return why
    ok = [r for r in rows if r["status"] == "ok" and r["provider"] != BASELINE
          and r["speedup_vs_nn_gru"] is not None]
    if not ok:
        return "nothing to plot (no provider besides nn.GRU was timed)"
    panels = sorted({(r["grid"], r["mode"], r["dtype"]) for r in ok})
    # packed and rollout cells are not a sweep over B: one bar per (cell, provider)
    bars = {p for p in panels if any(r.get("lengths") for r in ok if
                                     (r["grid"], r["mode"], r["dtype"]) == p)}
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.8 * nrow), squeeze=False)
    for ax, (grid, mode, dtype) in zip(axes.flat, panels):
        sel = [r for r in ok if (r["grid"], r["mode"], r["dtype"]) == (grid, mode, dtype)]
        if (grid, mode, dtype) in bars:
            _bar_panel(ax, sel, f"{grid} {mode} {dtype}")
            continue
        for prov, H in sorted({(r["provider"], r["H"]) for r in sel}):
            # several T in one grid (cpu): the largest T is plotted, the table has the rest
            by_b: Dict[int, float] = {}
            for r in sorted(sel, key=lambda r: r["T"]):
                if (r["provider"], r["H"]) == (prov, H):
                    by_b[r["B"]] = r["speedup_vs_nn_gru"]
            pts = sorted(by_b.items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{prov} H={H}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ys = [r["speedup_vs_nn_gru"] for r in sel]
        if max(ys) / min(ys) > 20:  # speed-ups over orders of magnitude
            ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("speed-up vs nn.GRU")
        Ts = sorted({r["T"] for r in sel})
        ax.set_title(f"{grid} {mode} {dtype} T={Ts[-1]}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"fusedgru vs nn.GRU on {meta.get('device_name')} "
                 f"(torch {meta.get('torch')}, {str(meta.get('commit'))[:7]}, "
                 f"{str(meta.get('date'))[:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _bar_panel(ax, sel: Sequence[dict], title: str) -> None:
    """Speed-up vs nn.GRU of each provider on each cell of a packed or rollout panel."""
    cells = list(dict.fromkeys(
        (r["H"], r["T"], r["layers"], r["bidirectional"], r.get("lengths"), r.get("packing"))
        for r in sel))
    provs = sorted({r["provider"] for r in sel})
    width = 0.8 / max(1, len(provs))
    for k, prov in enumerate(provs):
        ys = []
        for c in cells:
            m = [r["speedup_vs_nn_gru"] for r in sel if r["provider"] == prov and
                 (r["H"], r["T"], r["layers"], r["bidirectional"], r.get("lengths"),
                  r.get("packing")) == c]
            ys.append(m[0] if m else 0.0)
        ax.bar([i + k * width for i in range(len(cells))], ys, width, label=prov)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cells))])
    ax.set_xticklabels([f"{c[4]} H={c[0]}" + (f" {c[2]}x{2 if c[3] else 1}" if c[2] > 1 or c[3]
                                              else "") for c in cells],
                       fontsize=7, rotation=20)
    ax.set_ylabel("speed-up vs nn.GRU")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
