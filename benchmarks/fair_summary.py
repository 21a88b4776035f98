"""Write docs/results/summary.md: every committed fair-protocol run side by side (amad.bench.fair_summary).

    python benchmarks/fair_summary.py [RESULTS_DIR]    # default: docs/results
"""

import sys
from pathlib import Path

from amad.bench.fair_summary import write_summary

if __name__ == "__main__":
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "results"
    print(f"wrote {write_summary(results)}")
