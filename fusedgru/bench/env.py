"""The machine, versions and commit recorded with every run."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional, Tuple

import torch

from .. import ops


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> Tuple[str, Optional[bool]]:
    """(commit, dirty) of the checkout fusedgru runs from; FUSEDGRU_COMMIT overrides it
    (a copy of the tree without .git, as on the device machine)."""
    if os.environ.get("FUSEDGRU_COMMIT"):
        return os.environ["FUSEDGRU_COMMIT"], None
    root = Path(__file__).resolve().parents[2]  # the checkout: fusedgru/bench/env.py
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip() != ""
        return sha, dirty
    except Exception:  # noqa: BLE001 - no git, not a checkout
        return "unknown", None


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:40]


def environment(device: torch.device) -> dict:
    from .. import backends
    from ..version import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except Exception:  # noqa: BLE001
        ort_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = "sm_%d%d" % torch.cuda.get_device_capability(device)
    else:
        name, cap = f"CPU {_cpu_name()} ({os.cpu_count()} cores)", None
    sha, dirty = _commit()
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "device": device.type, "device_name": name, "capability": cap,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": triton_version, "onnxruntime": ort_version,
        "python": platform.python_version(),
        "fusedgru": __version__, "commit": sha, "dirty": dirty,
        "date": now.isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "tf32": {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                 "cuda.matmul.allow_tf32": ops.tf32_matmul_allowed()},
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "backends": backends.backend_status(),
        "suggested_name": f"{now:%Y-%m-%d}_{_slug(name)}_{sha[:7]}",
    }
