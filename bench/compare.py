#!/usr/bin/env python3
"""compare -- egd against its same-run references, from egdbench's JSON results, at a glance.

    python bench/compare.py out.json                  # egd/EG and egd/direct for every figure of one run
    python bench/compare.py new.json --baseline old.json  # and how each egd figure moved since an earlier run

Each row is one figure of ``summary_median_of_reps`` (medians over the run's repetitions): egd's value, EG's and
the direct client's from the same run, and the ratios. A ratio is marked ``worse`` when it is on the wrong side of
1 for that figure (higher is better for throughputs, lower for times and sizes). With ``--baseline``, egd's own
change since the baseline run is shown too, and a move of more than ``--tolerance`` (default 10 %) in the wrong
direction is flagged ``REGRESSION`` (exit status 1): egd's ratios to its references, not raw figures, are
compared, since these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: Figures where a higher value is better; every other figure is a time, a size or a count of losses.
HIGHER_IS_BETTER = ("per_s", "mib_per_s", "msgs_per_s", "lines_per_s")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is an improvement."""
    return metric.endswith(HIGHER_IS_BETTER)


def load(path: str) -> dict[str, dict[str, float]]:
    """``{target: {metric: median}}`` of an egdbench JSON file."""
    data = json.loads(Path(path).read_text())
    summary = data.get("summary_median_of_reps")
    if not isinstance(summary, dict):
        raise SystemExit(f"{path}: not an egdbench result (no summary_median_of_reps)")
    return {target: {k: v for k, v in values.items() if isinstance(v, (int, float))}
            for target, values in summary.items() if isinstance(values, dict)}


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, None when either is missing or den is 0."""
    if num is None or den in (None, 0):
        return None
    return num / den  # type: ignore[operator]


def verdict(metric: str, value: float | None) -> str:
    """``worse`` when a ratio of egd to a reference is on the wrong side of 1."""
    if value is None:
        return ""
    return "worse" if (value < 1 if higher_is_better(metric) else value > 1) else ""


def fmt(value: float | None) -> str:
    """A figure or ratio, short."""
    if value is None:
        return "-"
    return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def rows(run: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]] | None,
         tolerance: float) -> tuple[list[list[str]], int]:
    """The table's rows and how many regressions they flag."""
    egd = run.get("egd", {})
    table, regressions = [], 0
    for metric in sorted(egd):
        eg_ratio = ratio(egd[metric], run.get("eg", {}).get(metric))
        direct_ratio = ratio(egd[metric], run.get("direct", {}).get(metric))
        row = [metric, fmt(egd[metric]), fmt(run.get("eg", {}).get(metric)), fmt(eg_ratio), verdict(metric, eg_ratio),
               fmt(run.get("direct", {}).get(metric)), fmt(direct_ratio), verdict(metric, direct_ratio)]
        if baseline is not None:
            # Ratios to the same-run reference are compared where there is one: they cancel the machine's mood.
            for reference in ("direct", "eg"):
                now = ratio(egd[metric], run.get(reference, {}).get(metric))
                before = ratio(baseline.get("egd", {}).get(metric), baseline.get(reference, {}).get(metric))
                if now is not None and before is not None:
                    break
            else:
                reference, now, before = "raw", egd[metric], baseline.get("egd", {}).get(metric)
            change = ratio(now, before)
            flag = ""
            if change is not None and (change < 1 - tolerance if higher_is_better(metric) else change > 1 + tolerance):
                flag = "REGRESSION"
                regressions += 1
            row += [f"{fmt(change)} ({reference})", flag]
        table.append(row)
    return table, regressions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", help="an egdbench --json file")
    parser.add_argument("--baseline", default=None, help="an earlier egdbench --json file to compare egd with")
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed move in the wrong direction (0.10)")
    args = parser.parse_args()
    baseline = load(args.baseline) if args.baseline else None
    table, regressions = rows(load(args.result), baseline, args.tolerance)
    header = ["figure", "egd", "EG", "egd/EG", "", "direct", "egd/direct", ""]
    if baseline is not None:
        header += ["now/before", ""]
    widths = [max(len(str(r[i])) for r in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if baseline is not None:
        print(f"\n{regressions} regression(s) beyond {args.tolerance:.0%}")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
