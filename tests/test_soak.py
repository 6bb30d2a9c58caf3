"""The short soak and chaos run (bench/soak.py) as a test: about 60 s of mixed load.

200 client connections (keep-alive and not, bodies up to 64 KiB) through `--workers 2` while
the shadow cycles through ok, slow, hung, resetting and dead every 5 s, one worker is killed
with SIGKILL half-way, and (when PostgreSQL's binaries are installed) the store is a private
PostgreSQL stopped at 40% and started at 60% of the run. The run's own checks decide: zero
client errors outside the killed worker's connections, the worker restarted, descriptors
flat, the store caught up. The RSS slope of a one-minute run says little (the long run's
figure is in docs/resilience.md), so the bound here only catches a gross leak.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "bench" / "soak.py"


def _have_postgres() -> bool:
    return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb"))


@pytest.mark.timeout(240)
def test_soak_and_chaos_short(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    cmd = [
        sys.executable,
        str(SOAK),
        "--duration",
        "60",
        "--warmup",
        "15",
        "--phase",
        "5",
        "--connections",
        "200",
        "--rate",
        "300",
        "--workers",
        "2",
        "--kill-worker-at",
        "30",
        "--max-slope",
        "30",
        "--json",
        str(out),
    ]
    if _have_postgres():
        cmd.append("--postgres")
    elif os.environ.get("CI"):
        pytest.fail("PostgreSQL binaries missing in CI")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=220, check=False)
    assert out.exists(), f"no result: {done.stdout[-2000:]}{done.stderr[-4000:]}"
    result = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    # the load ran: most of the offered requests were answered, copies were made
    assert result["requests"] >= 0.7 * 300 * 60, result["requests"]
    assert result["shadow_outcomes"]["sent"] > 1000
    # each chaos phase left its mark on the shadow's outcomes
    outcomes = result["shadow_outcomes"]
    assert outcomes["ok"] > 0 and outcomes["timeout"] > 0 and outcomes["error"] > 0, outcomes
    failed = [name for name, ok in result["checks"].items() if not ok]
    assert not failed, f"{failed}\n{done.stderr[-4000:]}"
    assert done.returncode == 0
