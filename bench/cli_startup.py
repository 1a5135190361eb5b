"""How long an operator waits for `escrowd --version` and `escrowd --help`: the installed
console script timed as a whole process, start to exit, beside the bare interpreter
(`python -c pass`) as the baseline in the same run.

Usage (from the repository root): python -m bench.cli_startup [--runs 20]
Target: both commands under 0.5 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _timed(command: list[str], runs: int) -> list[float]:
    figures = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        figures.append(time.perf_counter() - started)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    script = shutil.which("escrowd", path=str(Path(sys.executable).parent)) or shutil.which(
        "escrowd"
    )
    if script is None:
        raise SystemExit("the escrowd console script is not installed beside this Python")
    commands = {
        "python -c pass (baseline)": [sys.executable, "-c", "pass"],
        "escrowd --version": [script, "--version"],
        "escrowd --help": [script, "--help"],
    }
    print(f"{os.cpu_count()} CPUs, {args.runs} runs each, seconds per process")
    print(f"{'command':<28} {'min':>7} {'median':>7} {'max':>7}")
    for label, command in commands.items():
        figures = _timed(command, args.runs)
        print(
            f"{label:<28} {min(figures):7.3f} {statistics.median(figures):7.3f} {max(figures):7.3f}"
        )


if __name__ == "__main__":
    main()
