"""The last step of benchmarks/gpu_run.sh: summary.json and a short table.

Reads the steps file gpu_run.sh kept (name, exit status, seconds, note per line), the
verdict lines of run.log and sanitizer.log, and the benchmark's results.json files, and
writes $OUT/summary.json.  Never fails: a missing piece is recorded as missing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import sys
from pathlib import Path

PYTEST_RE = re.compile(r"(\d+ (passed|failed|error|errors|skipped|deselected)[^\n]*"
                       r"|no tests ran[^\n]*)")
VERDICT_RE = re.compile(r"(ERROR SUMMARY: \d+ errors?|RACECHECK SUMMARY: \d+ hazards?[^\n]*"
                        r"|sanitize_cases: \d+ passed, \d+ failed|^\d+ passed, \d+ failed[^\n]*)",
                        re.MULTILINE)


def _sections(path: Path) -> dict:
    """{step name: the text it printed} from the '===== step NAME: ... =====' headers."""
    out, name = {}, None
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        m = re.match(r"===== step (\S+): ", line)
        if m:
            name = m.group(1)
            out.setdefault(name, [])
        elif name is not None:
            out[name].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def _last(regex, text: str):
    hits = regex.findall(text or "")
    if not hits:
        return None
    h = hits[-1]
    return (h[0] if isinstance(h, tuple) else h).strip()


def _read_json(path: Path):
    """(the file's JSON, None), or (None, why not as a summary entry)."""
    if not path.exists():
        return None, {"file": path.name, "missing": True}
    try:
        return json.loads(path.read_text()), None
    except Exception as exc:  # noqa: BLE001
        return None, {"file": path.name, "unreadable": f"{type(exc).__name__}: {exc}"}


def _bench_summary(path: Path) -> dict:
    res, absent = _read_json(path)
    if absent:
        return absent
    rows = res.get("rows", [])
    meta = res.get("meta", {})
    by_status = {}
    for r in rows:
        by_status[r.get("status")] = by_status.get(r.get("status"), 0) + 1
    providers = {}
    for r in rows:
        p = providers.setdefault(r["provider"], {"ok": 0, "WRONG": 0, "error": 0, "speedups": []})
        if r.get("status") in ("ok", "WRONG", "error"):
            p[r["status"]] += 1
        if r.get("status") == "ok" and r.get("speedup_vs_nn_gru") is not None:
            p["speedups"].append(r["speedup_vs_nn_gru"])
    for p in providers.values():
        s = p.pop("speedups")
        p["speedup_median"] = statistics.median(s) if s else None
        p["speedup_min"] = min(s) if s else None
        p["speedup_max"] = max(s) if s else None
    return {"file": str(path), "device_name": meta.get("device_name"),
            "torch": meta.get("torch"), "cuda": meta.get("cuda"), "cudnn": meta.get("cudnn"),
            "triton": meta.get("triton"), "commit": meta.get("commit"),
            "tf32": meta.get("tf32_run"), "grids": meta.get("grids"),
            "elapsed_s": meta.get("elapsed_s"), "rows_by_status": by_status,
            "providers": providers, "wrong_or_failed": [
                f"{r['provider']} {r['mode']} {r['dtype']} B={r['B']} H={r['H']} T={r['T']}: "
                f"{r.get('status')}: {str(r.get('reason'))[:200]}"
                for r in rows if r.get("status") in ("WRONG", "error")][:40]}


def _large_h_summary(path: Path) -> dict:
    """benchmarks/large_h.py's verdict: per cell, the fastest Triton large-H strategy."""
    res, absent = _read_json(path)
    if absent:
        return absent
    cells, errors = {}, []
    for r in res.get("rows", []):
        key = f"{r['dtype']} {r['mode']} B={r['B']} H={r['H']}"
        if r.get("ms") is not None:
            cells.setdefault(key, {})[r["provider"]] = round(r["speedup_vs_nn_gru"] or 0, 3)
        elif str(r.get("status", "")).startswith("error"):
            errors.append(f"{key} {r['provider']}: {r['status'][:200]}")
    wins = {}
    for key, by in cells.items():
        tri = {p: v for p, v in by.items() if p.startswith("triton")}
        if tri:
            best = max(tri, key=tri.get)
            by["fastest_triton"] = best
            wins[best] = wins.get(best, 0) + 1
    return {"file": path.name, "device_name": res.get("meta", {}).get("device_name"),
            "speedup_vs_nn_gru": cells, "fastest_triton_count": wins, "errors": errors[:20]}


def _step_variants_summary(path: Path) -> dict:
    """benchmarks/step_variants.py's verdict: per cell, us per step of each step variant,
    its speed-up over variant 0 and nn.GRU, and whether its outputs were variant 0's bits."""
    res, absent = _read_json(path)
    if absent:
        return absent
    cells, problems = {}, []
    for r in res.get("rows", []):
        key = f"{r['dtype']} {r['mode']} B={r['B']} H={r['H']}"
        if r.get("ms") is not None:
            cells.setdefault(key, {})[r["provider"]] = {
                "us_per_step": round(r["us_per_step"], 3),
                "vs_nn_gru": round(r["speedup_vs_nn_gru"], 3),
                "vs_variant_0": round(r["speedup_vs_variant_0"], 3)}
        if r.get("status") != "ok":
            problems.append(f"{key} {r.get('provider')}: {str(r.get('status'))[:200]}")
    return {"file": path.name, "dry_run": bool(res.get("dry_run")), "cells": cells,
            "problems": problems[:20]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", default="0")
    p.add_argument("--predicted", type=int, default=None,
                   help="gpu_run.sh's predicted seconds of steps env..stream on the GPU")
    p.add_argument("--budget", type=int, default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    log = _sections(out / "run.log")
    san = _sections(out / "sanitizer.log")
    steps = []
    try:
        lines = Path(args.steps).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        name, rc, secs, note = (line.split("\t") + ["", "", "", ""])[:4]
        text = log.get(name) or san.get(name) or ""
        verdict = None
        if name.startswith("pytest") or name == "ecosystem":
            verdict = _last(PYTEST_RE, text)
        elif name in ("memcheck", "racecheck", "check"):
            verdict = _last(VERDICT_RE, text)
        ok = rc == "0" or (name.startswith("pytest") and rc == "5")  # 5: nothing selected
        steps.append({"step": name, "rc": rc, "seconds": int(secs or 0), "note": note,
                      "ok": ok if rc != "skipped" else None, "verdict": verdict})
    summary = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("FUSEDGRU_COMMIT"),
        "dry_run": args.dry_run == "1",
        "steps": steps,
        "bench": _bench_summary(out / "results.json"),
        "bench_rest": _bench_summary(out / "rest" / "results.json"),
        "large_h": _large_h_summary(out / "large_h.json"),
        "step_variants": _step_variants_summary(out / "step_variants.json"),
        "predicted_gpu_seconds": args.predicted,
        "budget_seconds": args.budget,
        "measured_seconds": sum(s["seconds"] for s in steps),
        "files": sorted({str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()}
                        | {"summary.json"}),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    print("\n================ gpu_run summary ================")
    print(f"{'step':14} {'rc':>7} {'s':>5}  verdict / note")
    for s in steps:
        print(f"{s['step']:14} {s['rc']:>7} {s['seconds']:>5}  "
              f"{s['verdict'] or ''} {s['note'] or ''}".rstrip())
    for key in ("bench", "bench_rest"):
        b = summary[key]
        if b.get("missing") or b.get("unreadable"):
            print(f"\n{key}: no results ({b.get('unreadable') or 'missing'})")
            continue
        print(f"\n{key}: {b['device_name']}, torch {b['torch']}, cuDNN {b['cudnn']}, "
              f"TF32 {b['tf32']}, grids {b['grids']}, {b['elapsed_s']} s, rows "
              f"{b['rows_by_status']}")
        print(f"  {'provider':12} {'ok':>4} {'WRONG':>5} {'error':>5} "
              f"{'speed-up vs nn.GRU: median':>27} {'min':>6} {'max':>6}")
        for name, pr in b["providers"].items():
            def f(v):
                return "-" if v is None else f"{v:.2f}"
            print(f"  {name:12} {pr['ok']:>4} {pr['WRONG']:>5} {pr['error']:>5} "
                  f"{f(pr['speedup_median']):>27} {f(pr['speedup_min']):>6} "
                  f"{f(pr['speedup_max']):>6}")
        for w in b["wrong_or_failed"][:10]:
            print(f"  ! {w}")
    lh = summary["large_h"]
    if lh.get("speedup_vs_nn_gru"):
        print(f"\nlarge_h: fastest Triton strategy per cell {lh['fastest_triton_count']}")
        for key, by in lh["speedup_vs_nn_gru"].items():
            print(f"  {key:28} " + " ".join(f"{p}={v}" for p, v in by.items()))
    for e in lh.get("errors", [])[:10]:
        print(f"  ! large_h {e}")
    sv = summary["step_variants"]
    if sv.get("cells"):
        print("\nstep variants (us per step, x vs variant 0):")
        for key, by in sv["cells"].items():
            print(f"  {key:28} " + " ".join(f"{p}={v['us_per_step']}us/{v['vs_variant_0']}x"
                                              for p, v in by.items()))
    for e in sv.get("problems", [])[:10]:
        print(f"  ! step_variants {e}")
    print(f"\nfiles in {out}: {', '.join(summary['files'])}")
    if args.predicted is not None:
        print(f"predicted GPU time (steps env..stream, benchmarks/gpu_run.sh header): "
              f"{args.predicted} s of a {args.budget} s budget"
              f"{' (dry run: the steps above ran on the CPU)' if args.dry_run == '1' else ''}; "
              f"measured here: {summary['measured_seconds']} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # noqa: BLE001 - the summary must never hide the run
        print(f"gpu_summary.py failed: {type(exc).__name__}: {exc}")
        sys.exit(0)
