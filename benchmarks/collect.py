"""Rebuild benchmarks/RESULTS.md from the latest output of every benchmark (benchmarks/results/*.md).

Each benchmark writes its own table, command and machine to ``results/<name>.md``; this script only
concatenates them, so no figure in RESULTS.md is typed by hand. Run: ``python benchmarks/collect.py``.
"""

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    "hessian_vs_pyhessian", "hessian_cold_start", "hvp_cost", "spectrum_overhead", "outside_modules", "absa_table",
    "attacks_vs_torchattacks", "adversarial_training", "boundary_thickness", "hawq_table", "zeroq_table",
    "transformer_hawq", "allocation_speed", "integer_latency", "kfac", "kfac_batch_size", "adahessian",
]


def main() -> None:
    found = {p.stem: p for p in sorted((HERE / "results").glob("*.md"))}
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    parts = [
        "# Benchmark results\n",
        "Latest figures of every script in `benchmarks/`, each section written by the script itself "
        "(command and machine included). Rebuild with `python benchmarks/collect.py`.\n",
        *(f"- [{n}](#{n})" for n in names),
        "",
    ]
    for name in names:
        body = found[name].read_text().strip()
        parts += [f'<a id="{name}"></a>\n', re.sub(r"^(#+) ", r"#\1 ", body, flags=re.M), ""]
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'} from {len(names)} result files")


if __name__ == "__main__":
    main()
