"""Shared helpers for the benchmark scripts: a one-line machine description and the results writer."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine(*versions: str) -> str:
    """CPU model, cores, load, and library versions (``versions``: peers', e.g. "ortools 9.10"), for the
    header of every result file."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores (load {load:.2f}), {torch.get_num_threads()} torch thread(s){gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}" + "".join(f", {v}" for v in versions))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (left-aligned columns)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def command() -> str:
    return "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def write_result(name: str, text: str) -> Path:
    """Print ``text`` and save it as ``results/<name>.md`` (collect.py builds RESULTS.md from these)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text.rstrip() + "\n")
    print(text)
    return path
