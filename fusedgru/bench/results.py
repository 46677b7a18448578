"""results.json: one row per (cell, provider), beside the run's "meta" (the machine,
versions, commit, threads and TF32 setting: env.py); what identifies a row across runs;
writing it and reading it back (files written before a field was added read as well)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from .grids import Case
from .providers import BASELINE, Provider
from .timing import spread

SCHEMA = 1
_KEY = ("B", "H", "T", "I", "layers", "bidirectional", "dtype", "mode", "call", "lengths",
        "packing")
PEER_KINDS = ("baseline", "peer")  # rollout cells: the ways "vs best" is taken over


def _row_key(r: dict) -> tuple:
    return tuple(r[k] for k in _KEY) + (r["provider"],)


def _row_label(r: dict) -> str:
    """The cell of a row in words (without its grid's name, as _KEY)."""
    return (f"{r['mode']} {r['dtype']} B={r['B']} H={r['H']} T={r['T']}"
            + (f" I={r['I']}" if r["I"] != r["H"] else "")
            + (f" L={r['layers']}" if r["layers"] != 1 else "")
            + (" bi" if r["bidirectional"] else "")
            + (f" {r['call']}" if r.get("call", "seq") not in ("seq", "packed", "rollout")
               else "")
            + (f" {r['lengths']}" if r.get("lengths") else "")
            + (f" {r['packing']}" if r.get("packing") else ""))


def _case_fields(case: Case) -> dict:
    return {k: v for k, v in asdict(case).items()}


def row_precision(dtype: str, tf32: Optional[bool]) -> str:
    """The arithmetic a row's float32 products ran in, for every provider of the row (nn.GRU
    and fusedgru's GPU backends follow the same flag, ops.rnn_tf32_allowed): "tf32" or
    "ieee" (strict float32; on the CPU always), else the dtype itself."""
    if dtype == "float32":
        return "tf32" if tf32 else "ieee"
    return dtype


def _blank_row(case: Case, p: Provider, tf32: Optional[bool], status: str = "ok",
               reason: Optional[str] = None) -> dict:
    return {**_case_fields(case), "provider": p.name, "kind": p.kind, "status": status,
            "precision": row_precision(case.dtype, tf32),
            "reason": reason, "median_ms": None, "us_per_step": None,
            "speedup_vs_nn_gru": None, "peak_mem_bytes": None, "saved_bytes": None,
            "mem_vs_nn_gru": None, "check": None, "timing": None, "spread": None,
            "tf32": tf32, "seq": None,
            # rollout cells: against each peer way (nn.GRU's and TorchRL's) and the fastest
            "speedup_vs": None, "speedup_vs_best": None, "best_peer": None}


def _mem(row: dict) -> Optional[int]:
    return row["peak_mem_bytes"] if row["peak_mem_bytes"] is not None else row["saved_bytes"]


def _relative_to_baseline(rows: List[dict]) -> None:
    base = next((r for r in rows if r["provider"] == BASELINE and r["status"] == "ok"), None)
    if base is None:
        return
    for r in rows:
        if r["status"] != "ok":
            continue
        if r["median_ms"]:
            r["speedup_vs_nn_gru"] = base["median_ms"] / r["median_ms"]
        if _mem(r) is not None and _mem(base):
            r["mem_vs_nn_gru"] = _mem(r) / _mem(base)
    _relative_to_peers(rows)


def _relative_to_peers(rows: List[dict]) -> None:
    """Where a cell has peer ways beside the baseline (rollout cells: nn.GRU's masked loop,
    its segments, TorchRL's): each row's speed-up against each of them ("speedup_vs",
    peer median / row median) and against the fastest ("speedup_vs_best", "best_peer")."""
    if not any(r.get("kind") == "peer" and r["status"] == "ok" for r in rows):
        return
    peers = {r["provider"]: r["median_ms"] for r in rows
             if r.get("kind") in PEER_KINDS and r["status"] == "ok" and r["median_ms"]}
    if not peers:
        return
    best = min(peers, key=peers.get)
    for r in rows:
        if r["status"] == "ok" and r["median_ms"]:
            r["speedup_vs"] = {p: ms / r["median_ms"] for p, ms in peers.items()}
            r["speedup_vs_best"], r["best_peer"] = peers[best] / r["median_ms"], best


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str, allow_nan=True))
    tmp.replace(path)


def load_results(path) -> dict:
    """A results.json as written, with the fields added since filled in: a row without
    "spread" gets it from its timing's IQR where that was recorded (None otherwise)."""
    results = json.loads(Path(path).read_text())
    for r in results.get("rows", []):
        r.setdefault("call", "seq")  # before GRUCell cells existed, every cell was "seq"
        r.setdefault("lengths", "")  # before packed and rollout cells existed
        r.setdefault("packing", "")
        if "spread" not in r:
            r["spread"] = spread(r.get("median_ms"), (r.get("timing") or {}).get("iqr_ms"))
    return results
