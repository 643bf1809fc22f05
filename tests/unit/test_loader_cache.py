"""The converted-model cache is keyed by the GGUF file's content, not its name and size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from treadle.worker.loader import conversion_target


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TREADLE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write(path: Path, data: bytes, mtime_ns: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def test_same_name_size_and_time_but_other_bytes_get_another_folder(
    tmp_path: Path, cache: Path
) -> None:
    a = write(tmp_path / "a" / "model.gguf", b"GGUF" + b"\x00" * 60, 1_700_000_000_000_000_000)
    b = write(tmp_path / "b" / "model.gguf", b"GGUF" + b"\x01" * 60, 1_700_000_000_000_000_000)
    assert conversion_target(a) != conversion_target(b)
    assert conversion_target(a).parent == cache / "models"
    assert conversion_target(a).name.startswith("model-")


def test_the_same_bytes_elsewhere_share_the_folder_and_the_hash_is_remembered(
    tmp_path: Path, cache: Path
) -> None:
    a = write(tmp_path / "a" / "model.gguf", b"GGUF-same", 1)
    b = write(tmp_path / "b" / "model.gguf", b"GGUF-same", 2)
    assert conversion_target(a) == conversion_target(b)
    assert len(list((cache / "hashes").iterdir())) == 2  # one record per (path, size, time)
