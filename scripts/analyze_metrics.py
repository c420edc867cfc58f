"""The metrics guardrail (SLOs of a TOML file against a scrape or a Prometheus): see
operations/analyze_metrics.py, where it lives so that the installed `primerl
analyze-metrics` has it too.

    python scripts/analyze_metrics.py --slo deploy/slo/ci.toml artifacts/metrics.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file, Python puts scripts/ on the path, not the checkout: the checkout's code, not an installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operations.analyze_metrics import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
