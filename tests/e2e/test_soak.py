"""The fault soak at test size: 500 requests against a real `treadle serve` with the default model.

A third of them are cancelled mid-stream, deadlined or abandoned and a tenth
malformed (bench/soak_cases.py); nothing may be lost, every outcome must be
the one its kind must get, no UNKNOWN/INTERNAL status, and the server must
end with nothing running or waiting. The recorded 10,000-request run is
`python bench/soak.py` (bench/README.md).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `bench`

from bench.progress import Progress
from bench.soak import failures, parse_args, soak

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
def test_soak_of_500_requests_loses_nothing(tmp_path: Path) -> None:
    # 16 rows x 256 positions: the same paths as the defaults, a fraction of the KV memory
    sizes = ["--max-batch-rows", "16", "--max-seq-len", "256"]
    args = parse_args(["--requests", "500", "--clients", "32", "--out", str(tmp_path), *sizes])
    report = asyncio.run(asyncio.wait_for(soak(args, Progress(label="soak")), timeout=600))
    assert report["requests"] == 500
    assert report["lost"] == 0, report
    assert report["wrong"] == 0, report["wrong_examples"]
    assert report["bad_statuses"] == 0, report["by_kind"]
    assert set(report["by_kind"]) == {
        "stream",
        "unary",
        "session",
        "cancel",
        "deadline",
        "abandon",
        "malformed",
    }
    assert failures(report) == []
