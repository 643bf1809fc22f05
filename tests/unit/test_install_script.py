"""deploy/local/install.sh: which torch it asks pip for; everything else comes from the lock.

The script runs for real against a stand-in virtual environment whose
`python` records every pip command instead of running it, so nothing is
downloaded; the stand-in can refuse the local-wheel attempt, as a machine
without a local CPU wheel of torch would.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "local" / "install.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def fake_venv(tmp_path: Path, local_wheel: bool) -> tuple[Path, Path]:
    """A venv whose python logs `pip ...` lines; `--no-index` fails unless `local_wheel`."""
    venv, log = tmp_path / "venv", tmp_path / "pip.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> "{log}"\n'
        f'if [[ "$*" == *--no-index* && "{int(local_wheel)}" == 0 ]]; then exit 1; fi\n'
    )
    python.chmod(0o755)
    return venv, log


def run_install(venv: Path, *args: str, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "TREADLE_TORCH")}
    environ |= {"TREADLE_VENV": str(venv), **env}
    subprocess.run(["bash", str(INSTALL), *args], env=environ, check=True, timeout=60)
    return (venv.parent / "pip.log").read_text().splitlines()


def torch_installs(lines: list[str]) -> list[str]:
    return [line for line in lines if " install " in f" {line} " and "torch==" in line]


@pytest.mark.parametrize("local_wheel", [True, False])
def test_the_default_install_takes_the_cpu_build_of_torch(
    tmp_path: Path, local_wheel: bool
) -> None:
    venv, _ = fake_venv(tmp_path, local_wheel)
    lines = run_install(venv)
    installs = torch_installs(lines)
    final = installs[-1]
    if local_wheel:
        assert "--no-index" in final and "torch==2.13.0+cpu" in final
    else:  # never the default index, whose Linux wheel is the CUDA build
        assert f"--index-url {CPU_INDEX}" in final
    assert all("--no-index" in i or CPU_INDEX in i for i in installs), installs
    assert all("--no-deps" in i for i in installs), installs


def test_cuda_is_asked_for_by_name(tmp_path: Path) -> None:
    venv, _ = fake_venv(tmp_path, local_wheel=True)
    installs = torch_installs(run_install(venv, TREADLE_TORCH="cuda"))
    assert installs == ["-m pip --disable-pip-version-check install -q torch==2.13.0"]


@pytest.mark.parametrize(("flag", "lock"), [((), "server"), (("--dev",), "dev")])
def test_everything_else_comes_from_the_lock_without_a_resolver(
    tmp_path: Path, flag: tuple[str, ...], lock: str
) -> None:
    venv, _ = fake_venv(tmp_path, local_wheel=True)
    lines = run_install(venv, *flag)
    installs = [line for line in lines if " install " in f" {line} "]
    assert any(
        f"-r {REPO}/requirements/{lock}.lock.txt" in i
        and "--require-hashes" in i
        and "--no-deps" in i
        for i in installs
    ), installs
    assert all("--no-deps" in i for i in installs if "torch" not in i), installs
    assert (venv / f".treadle-installed-{lock}").exists()
