"""Where the benchmarks leave their headline figures for `rs5m plan`: benchmarks/figures.json,
one entry per benchmark, replaced by each run (with the command, the date and the machine)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

FIGURES = Path(__file__).with_name("figures.json")


def record(benchmark: str, figures: dict) -> None:
    data = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    data[benchmark] = {**figures, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                       "recorded": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
                       "loadavg": round(os.getloadavg()[0], 1)}
    FIGURES.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
