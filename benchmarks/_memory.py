"""Peak-memory measurement shared by the step benchmarks (private).

A configuration is measured alone in a fresh Python process (the script itself, called
with ``--_memory-worker CONFIG_JSON``), so that nothing else it built, compiled or freed
shows up in its figure. On the CPU the figure is the growth of the resident set during the
steps: the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the
first step; else ``resource.getrusage`` maxrss) minus the RSS before the first step, so the
parameters, the interpreter and (in JAX) the compiled code are not included.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
from collections.abc import Callable
from typing import Any, Optional

__all__ = ["WORKER_FLAG", "rss_growth", "run_worker"]

#: The hidden command-line option that turns a step script into a memory worker.
WORKER_FLAG = "--_memory-worker"


def _rss_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def rss_growth(run: Callable[[], Any]) -> dict[str, Any]:
    """Call ``run()`` and return how far the resident set grew above its level before.

    Args:
        run: The steps to measure (already built and, in JAX, compiled).

    Returns:
        ``{"peak_mib": float, "memory_kind": "rss-growth"}``, or with ``memory_kind``
        ``"maxrss-growth (lower bound)"`` where the peak cannot be reset.
    """
    before = _rss_kib("VmRSS")
    reset = _reset_peak_rss()
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    if reset and before is not None:
        peak = _rss_kib("VmHWM")
        if peak is not None:
            return {"peak_mib": max(peak - before, 0) / 1024, "memory_kind": "rss-growth"}
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_maxrss
    return {"peak_mib": max(grown, 0) / 1024, "memory_kind": "maxrss-growth (lower bound)"}


def run_worker(script: str, config: dict[str, Any], *, timeout: float = 600.0,
               env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Run ``script --_memory-worker CONFIG`` in a fresh process; return its JSON answer.

    Args:
        script: Path of the step script (its ``__file__``).
        config: The configuration, as a JSON-serialisable dict.
        timeout: Seconds before the subprocess is abandoned.
        env: Extra environment variables for the worker.

    Returns:
        The worker's last stdout line parsed as JSON (``peak_mib`` and ``memory_kind``), or
        ``{"memory_error": str}`` when it failed or timed out.
    """
    command = [sys.executable, str(pathlib.Path(script).resolve()), WORKER_FLAG,
               json.dumps(config)]
    full_env = dict(os.environ, **(env or {}))
    root = str(pathlib.Path(__file__).resolve().parent.parent)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, full_env.get("PYTHONPATH")]))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=full_env, check=False)
    except subprocess.TimeoutExpired:
        return {"memory_error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"memory_error": f"exit {done.returncode}: {tail}"[:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])
