"""The committed stubs are what proto/generate.sh makes of the .proto (no drift)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS = ("treadle_pb2.py", "treadle_pb2.pyi", "treadle_pb2_grpc.py")


def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "proto" / "generate.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    for name in STUBS:
        fresh = (tmp_path / "treadle" / "v1" / name).read_text()
        committed = (ROOT / "proto" / "treadle" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run proto/generate.sh"


def test_every_rpc_and_field_has_a_comment() -> None:
    lines = (ROOT / "proto" / "treadle" / "v1" / "treadle.proto").read_text().splitlines()
    for i, line in enumerate(lines):
        code = line.strip()
        is_field = (
            code.endswith(";")
            and "=" in code
            and not code.startswith(("option", "//", "syntax", "package"))
        )
        is_rpc = code.startswith("rpc ")
        if is_field or is_rpc:
            assert lines[i - 1].strip().startswith("//"), f"line {i + 1} has no comment: {code}"


def test_api_reference_matches_the_proto() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "api_doc.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_the_wheel_ships_the_proto_beside_its_stubs(tmp_path: Path) -> None:
    """A program in another language generates its client from the installed package."""
    import shutil
    import zipfile

    # built from a copy: an in-tree build leaves build/ and an egg-info in the repository
    source = tmp_path / "source"
    junk = (".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*junk))
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip_wheel, "-q", "-w", str(tmp_path), str(source)],
        check=True,
        timeout=240,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    (wheel,) = tmp_path.glob("treadle-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"treadle/v1/treadle.proto", "treadle/v1/treadle_pb2.py"} <= names
    for package in ("api", "client", "server", "scheduler", "worker"):  # every root packaged
        assert f"treadle/{package}/__init__.py" in names
    shipped = zipfile.ZipFile(wheel).read("treadle/v1/treadle.proto").decode()
    assert shipped == (ROOT / "proto" / "treadle" / "v1" / "treadle.proto").read_text()
