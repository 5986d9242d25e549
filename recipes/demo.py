"""The main job (``make demo``): train with the Hessian spectrum and ABSA, analyze, quantize; one summary.

Runs the three recipes on MNIST-1D into ``logs/demo/{train,analyze,quantize}`` and prints a table of what
each stage measured with the paths of its plots. About a minute on two CPU cores.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = Path("logs/demo")
STAGES = {
    "train": ["train.py", "experiment=mnist1d_absa"],
    "analyze": ["analyze.py", f"run_dir={RUN / 'train'}", "probe.probe_size=500", "probe.probe_batch_size=500"],
    "quantize": ["quantize.py", "experiment=mnist1d_hawq", f"run_dir={RUN / 'train'}"],
}


def last_logged(metrics_csv: Path, key: str) -> float:
    with open(metrics_csv) as f:
        values = [row[key] for row in csv.DictReader(f) if row.get(key)]
    return float(values[-1])


def main() -> None:
    started = time.perf_counter()
    for stage, (script, *overrides) in STAGES.items():
        print(f"== {stage}", flush=True)
        command = [sys.executable, str(ROOT / "recipes" / script), *overrides, f"hydra.run.dir={RUN / stage}"]
        subprocess.run(command, check=True)
    metrics = RUN / "train" / "csv" / "metrics.csv"
    analysis = json.loads((RUN / "analyze" / "report.json").read_text())
    quant = json.loads((RUN / "quantize" / "quantize_report.json").read_text())
    rows = [
        ("float test accuracy", f"{last_logged(metrics, 'test/acc'):.4f}"),
        ("final batch size (ABSA, from 50)", f"{last_logged(metrics, 'abs/batch_size'):.0f}"),
        ("top Hessian eigenvalues", ", ".join(f"{v:.3g}" for v in analysis["eigenvalues"])),
        ("Hessian trace", f"{analysis['trace']['estimate']:.4g} ± {analysis['trace']['std_error']:.2g}"),
        ("HAWQ bits", ", ".join(f"{k}: {v}" for k, v in quant["weight_bits"].items())),
        ("quantized test accuracy", f"{quant['quantized']['test/acc']:.4f}"),
        ("integer-only (ONNX) test accuracy", f"{quant['integer']['test/acc']:.4f}"),
        ("weight size", f"{quant['size_kb']['float']:.1f} KB -> {quant['size_kb']['quantized']:.1f} KB"),
        ("wall time (three stages)", f"{time.perf_counter() - started:.0f} s"),
    ]
    plots = [
        *sorted((RUN / "train" / "hessian").glob("*.png")),
        *(Path(p) for p in analysis["figures"].values()),
        *sorted((RUN / "quantize" / "hawq").glob("*.png")),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n== summary")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("\nplots:")
    for path in plots:
        print(f"  {path}")


if __name__ == "__main__":
    main()
