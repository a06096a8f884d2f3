import json
import subprocess
import sys
from pathlib import Path


def test_worker_node_lost_mid_run_loses_and_duplicates_nothing(tmp_path):
    script = Path(__file__).with_name("multinode_scenario.py")
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "outcome.json").read_text())
    assert result["killed_mid_run"]
    assert result["ingest_rows"] == result["input_rows"] == 12_000
    assert result["kept"] + result["dropped"] == 12_000
    assert result["unique_ids"] == 12_000  # every row once: retried tasks rewrote, not added, ledger files
    assert result["kept_urls_unique"]
    assert result["kept"] == 9000 * 2 // 3  # one row per distinct URL whose caption hits
