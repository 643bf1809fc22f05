"""Structured output on this CPU: llguidance against xgrammar, compile time and per-step mask cost.

    /tmp/gvenv/bin/python bench/grammar_libs.py [--libs llguidance xgrammar] [--schemas N]
        [--rows 64] [--steps 100] [--warmup 5] [--threads 2] [--compile-repeats 3] [--out DIR]

Neither library is a treadle dependency, so run this from a separate virtualenv that sees the
main one's packages (torch must not be reinstalled, so --no-deps):

    python3 -m venv /tmp/gvenv
    echo "$PWD/.venv/lib/python3.11/site-packages" \
        > /tmp/gvenv/lib/python3.11/site-packages/main.pth
    /tmp/gvenv/bin/pip install --no-deps llguidance xgrammar apache-tvm-ffi

What it measures, on the tokenizer of the embedded SmolLM2-135M-Instruct (49,152 tokens) and the
JSON Schemas of bench/schemas/ (one per file):

1. setup, once per process: import, the library's tokenizer info, and the first grammar of the
   process (a trivial `{"type": "object"}`), which carries any lazy process-wide setup;
2. compile, cold, per schema: time to first mask (xgrammar: a fresh GrammarCompiler without cache,
   `compile_json_schema`, a GrammarMatcher and its first mask; llguidance: the grammar from the
   schema, an LLMatcher and its first mask, since llguidance builds its lexer lazily), plus
   xgrammar's compile alone; the median of --compile-repeats for each schema, then the median,
   p90 and max over the schemas;
3. per step at --rows matchers (schemas round-robin): fill one batch bitmask for every row with the
   library's batch call, apply it to a [rows, vocab] float32 logits tensor with the library's own
   apply function, take each row's argmax, advance every matcher by its token with the library's
   batch call. Logits are seeded random normals, fresh each step and the same sequence for both
   libraries, plus --structure-bias on the `"`, `,`, `:`, `}` and `]` tokens and minus it on the
   whitespace-only tokens, so that strings, arrays and objects close after a few tokens as a
   model's output would (with 0 a row spends its steps in free text or in runs of whitespace,
   which both libraries allow between tokens by default). A row whose mask allows only EOS takes
   EOS and is reset for a new document; a document longer than --max-doc-tokens is cut and reset;
4. every finished document (and every row accepting at the end) is parsed and validated with
   jsonschema: a check of the harness and of each library's grammar, not of output quality;
5. each available apply kernel alone on the last step's bitmask (the bitmask layout is the same in
   both libraries, so either library's kernel, or plain torch, serves either).

Progress goes to stderr; the report to stdout and to `<out>/grammar-libs-<UTC stamp>.txt`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import torch

REPO = Path(__file__).resolve().parent.parent

try:
    from treadle.worker.loader import cache_root
except ImportError:  # the usual case: a virtualenv without treadle, so the repository's copy
    sys.path.insert(0, str(REPO / "worker"))
    sys.path.insert(0, str(REPO / "api"))
    from treadle.worker.loader import cache_root

LIBRARIES = ("llguidance", "xgrammar")
CLOSERS = ('"', ",", ":", "}", "]")  # the tokens --structure-bias favours
TRIVIAL_SCHEMA = '{"type": "object"}'
MAX_EXAMPLES = 5  # invalid documents quoted in the report

ApplyFn = Callable[[torch.Tensor, torch.Tensor], None]


# ---------------------------------------------------------------- small helpers


def say(message: str) -> None:
    """One progress line on stderr."""
    print(f"[grammar-libs {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1e3


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return [line(header), *(line(r) for r in rows)]


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
    except OSError:
        return "?"
    return out.stdout.strip() or "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Schema:
    name: str
    text: str
    doc: dict[str, Any]


def load_schemas(folder: Path, limit: int | None) -> list[Schema]:
    files = sorted(folder.glob("*.json"))[:limit]
    if not files:
        raise SystemExit(f"no *.json schemas in {folder}")
    texts = [(f.stem, f.read_text()) for f in files]
    return [Schema(name, text, json.loads(text)) for name, text in texts]


def default_tokenizer_dir() -> Path:
    """The first converted model in treadle's cache that has a tokenizer.json."""
    found = sorted((cache_root() / "models").glob("*/tokenizer.json"))
    if not found:
        raise SystemExit(
            f"no tokenizer.json under {cache_root() / 'models'}: pass --tokenizer DIR, or convert "
            "the model once (treadle.worker.loader.load_model(None))"
        )
    return found[0].parent


@dataclass(frozen=True)
class Vocab:
    tokenizer: Any  # a transformers fast tokenizer
    size: int  # the logits width: the model's vocab_size
    eos: int
    load_ms: float

    def decode(self, ids: Sequence[int]) -> str:
        return str(
            self.tokenizer.decode(
                list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        )

    def single_token(self, text: str) -> int | None:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return int(ids[0]) if len(ids) == 1 else None


def load_vocab(folder: Path) -> Vocab:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    load_ms = ms_since(started)
    config = folder / "config.json"
    size = json.loads(config.read_text())["vocab_size"] if config.exists() else len(tokenizer)
    return Vocab(tokenizer, int(size), int(tokenizer.eos_token_id), load_ms)


def structure_bias(vocab: Vocab, bias: float) -> torch.Tensor:
    """A [vocab] row: +bias on the CLOSERS tokens, -bias on the whitespace-only tokens."""
    row = torch.zeros(vocab.size)
    pieces = vocab.tokenizer.batch_decode([[i] for i in range(vocab.size)])
    row[[i for i, piece in enumerate(pieces) if piece and piece.isspace()]] = -bias
    for text in CLOSERS:
        closer = vocab.single_token(text)
        if closer is not None:
            row[closer] = bias
    return row


def words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


# ---------------------------------------------------------------- the two libraries


@dataclass(frozen=True)
class Setup:
    import_ms: float
    tokenizer_ms: float


@dataclass(frozen=True)
class Cold:
    """One cold compile of one schema; times in ms."""

    ttfm_ms: float
    compile_ms: float | None = None  # xgrammar only
    memory_kb: float | None = None  # xgrammar only
    error: str = ""


class Rows(Protocol):
    """One library's matchers for the rows of a batch."""

    def fill(self, bitmask: torch.Tensor) -> None: ...
    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None: ...
    def advance(self, tokens: list[int]) -> list[bool]: ...
    def accepting(self, row: int) -> bool: ...
    def reset(self, row: int) -> None: ...


class Library(Protocol):
    name: str
    setup: Setup

    def paths(self) -> list[str]: ...
    def cold(self, schema: Schema) -> Cold: ...
    def rows(self, schemas: Sequence[Schema]) -> Rows: ...
    def apply_kernels(self) -> dict[str, ApplyFn]: ...


class LlgRows:
    def __init__(self, lib: LlgLibrary, schemas: Sequence[Schema]) -> None:
        grammars = {s.name: lib.llg.LLMatcher.grammar_from_json_schema(s.text) for s in schemas}
        self.lt = lib.lt
        self.executor = lib.executor
        self.matchers = [lib.llg.LLMatcher(lib.tok, grammars[s.name], log_level=0) for s in schemas]
        self.slots = [(m, i) for i, m in enumerate(self.matchers)]
        for m in self.matchers:
            if m.is_error():
                raise RuntimeError(f"llguidance matcher: {m.get_error()}")

    def fill(self, bitmask: torch.Tensor) -> None:
        self.lt.fill_next_token_bitmask_par(self.executor, self.slots, bitmask)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.lt.apply_token_bitmask_inplace(logits, bitmask)

    def advance(self, tokens: list[int]) -> list[bool]:
        pairs = list(zip(self.matchers, tokens, strict=True))
        return [bool(ok) for ok in self.lt.consume_token_par(self.executor, pairs)]

    def accepting(self, row: int) -> bool:
        return bool(self.matchers[row].is_accepting())

    def reset(self, row: int) -> None:
        self.matchers[row].reset()


class LlgLibrary:
    name = "llguidance"

    def __init__(self, vocab: Vocab, threads: int) -> None:
        started = time.perf_counter()
        import llguidance
        import llguidance.hf
        import llguidance.numpy
        import llguidance.torch

        import_ms = ms_since(started)
        started = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(vocab.tokenizer, n_vocab=vocab.size)
        self.setup = Setup(import_ms, ms_since(started))
        self.llg, self.lt, self.lnp = llguidance, llguidance.torch, llguidance.numpy
        self.threads = threads
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.one_row = llguidance.torch.allocate_token_bitmask(1, vocab.size)

    def paths(self) -> list[str]:
        return [
            f"fill    llguidance.torch.fill_next_token_bitmask_par(LLExecutor({self.threads}))",
            "apply   llguidance.torch.apply_token_bitmask_inplace (torch.compile, dynamic)",
            f"advance llguidance.torch.consume_token_par(LLExecutor({self.threads}))",
        ]

    def cold(self, schema: Schema) -> Cold:
        started = time.perf_counter()
        try:  # the matcher records grammar errors (get_error) rather than raising them
            grammar = self.llg.LLMatcher.grammar_from_json_schema(schema.text)
        except ValueError as exc:
            return Cold(ttfm_ms=math.nan, error=f"ValueError: {exc}")
        matcher = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        self.lt.fill_next_token_bitmask(matcher, self.one_row)
        return Cold(ttfm_ms=ms_since(started), error=str(matcher.get_error()))

    def rows(self, schemas: Sequence[Schema]) -> Rows:
        return LlgRows(self, schemas)

    def apply_kernels(self) -> dict[str, ApplyFn]:
        def numpy_apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
            self.lnp.apply_token_bitmask_inplace(logits.numpy(), bitmask.numpy())

        return {
            "llguidance.torch (torch.compile)": self.lt.apply_token_bitmask_inplace,
            "llguidance.numpy": numpy_apply,
        }


class XgrRows:
    def __init__(self, lib: XgrLibrary, schemas: Sequence[Schema]) -> None:
        xgr = lib.xgr
        compiler = xgr.GrammarCompiler(lib.info, max_threads=lib.threads)  # cached: once each
        compiled = {s.name: compiler.compile_json_schema(s.text) for s in schemas}
        self.xgr = xgr
        self.batch = xgr.BatchGrammarMatcher(max_threads=lib.threads)
        self.matchers = [xgr.GrammarMatcher(compiled[s.name]) for s in schemas]

    def fill(self, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(self.matchers, bitmask)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)

    def advance(self, tokens: list[int]) -> list[bool]:
        return [
            bool(ok)
            for ok in self.xgr.BatchGrammarMatcher.batch_accept_token(self.matchers, tokens)
        ]

    def accepting(self, row: int) -> bool:
        return bool(self.matchers[row].is_completed())

    def reset(self, row: int) -> None:
        self.matchers[row].reset()


class XgrLibrary:
    name = "xgrammar"

    def __init__(self, vocab: Vocab, threads: int) -> None:
        started = time.perf_counter()
        import xgrammar

        import_ms = ms_since(started)
        started = time.perf_counter()
        self.info = xgrammar.TokenizerInfo.from_huggingface(vocab.tokenizer, vocab_size=vocab.size)
        self.setup = Setup(import_ms, ms_since(started))
        self.xgr = xgrammar
        self.threads = threads
        self.one_row = xgrammar.allocate_token_bitmask(1, vocab.size)

    def paths(self) -> list[str]:
        return [
            f"fill    BatchGrammarMatcher({self.threads} threads).batch_fill_next_token_bitmask",
            "apply   xgrammar.apply_token_bitmask_inplace (auto: the C++ CPU kernel)",
            "advance BatchGrammarMatcher.batch_accept_token (one C++ call, serial loop)",
        ]

    def cold(self, schema: Schema) -> Cold:
        compiler = self.xgr.GrammarCompiler(
            self.info, max_threads=self.threads, cache_enabled=False
        )
        started = time.perf_counter()
        try:
            compiled = compiler.compile_json_schema(schema.text)
        except Exception as exc:  # an unsupported schema: reported, not fatal
            return Cold(ttfm_ms=math.nan, error=f"{type(exc).__name__}: {exc}")
        compile_ms = ms_since(started)
        matcher = self.xgr.GrammarMatcher(compiled)
        matcher.fill_next_token_bitmask(self.one_row)
        ttfm_ms = ms_since(started)
        memory_kb = compiled.memory_size_bytes / 1024
        return Cold(ttfm_ms=ttfm_ms, compile_ms=compile_ms, memory_kb=memory_kb)

    def rows(self, schemas: Sequence[Schema]) -> Rows:
        return XgrRows(self, schemas)

    def apply_kernels(self) -> dict[str, ApplyFn]:
        def backend(name: str) -> ApplyFn:
            return lambda logits, bitmask: self.xgr.apply_token_bitmask_inplace(
                logits, bitmask, backend=name
            )

        return {
            "xgrammar cpu (C++)": backend("cpu"),
            "xgrammar torch_native": backend("torch_native"),
        }


def start_library(name: str, vocab: Vocab, threads: int) -> Library:
    lib: Library = (
        LlgLibrary(vocab, threads) if name == "llguidance" else XgrLibrary(vocab, threads)
    )
    setup = lib.setup
    say(f"{name}: import {setup.import_ms:.0f} ms, tokenizer {setup.tokenizer_ms:.0f} ms")
    return lib


def apply_eager(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Plain torch, no compile: the reference apply kernel (bit j of word w is token 32w+j)."""
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, : logits.shape[1]]
    logits.masked_fill_(~allowed, float("-inf"))


# ---------------------------------------------------------------- compile (cold)


@dataclass
class CompileResult:
    first_trivial_ms: float = math.nan
    per_schema: dict[str, Cold] = field(default_factory=dict)


def median_cold(results: Sequence[Cold]) -> Cold:
    errors = [r.error for r in results if r.error]
    compiles = [r.compile_ms for r in results if r.compile_ms is not None]
    memory = [r.memory_kb for r in results if r.memory_kb is not None]
    return Cold(
        ttfm_ms=percentile([r.ttfm_ms for r in results], 50),
        compile_ms=percentile(compiles, 50) if compiles else None,
        memory_kb=memory[0] if memory else None,
        error=errors[0] if errors else "",
    )


def measure_compile(lib: Library, schemas: Sequence[Schema], repeats: int) -> CompileResult:
    trivial = Schema("trivial", TRIVIAL_SCHEMA, json.loads(TRIVIAL_SCHEMA))
    result = CompileResult(first_trivial_ms=lib.cold(trivial).ttfm_ms)
    for schema in schemas:
        runs = [lib.cold(schema) for _ in range(repeats)]
        result.per_schema[schema.name] = median_cold(runs)
        say(f"{lib.name} compile {schema.name}: {result.per_schema[schema.name].ttfm_ms:.1f} ms")
    return result


# ---------------------------------------------------------------- per-step mask run


PHASES = ("fill", "apply", "advance", "pick")


@dataclass(frozen=True)
class Document:
    schema: Schema
    text: str
    ended_by_eos: bool


@dataclass
class MaskResult:
    times: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    first_step: dict[str, float] = field(default_factory=dict)
    documents: list[Document] = field(default_factory=list)
    tokens_per_doc: list[int] = field(default_factory=list)
    rejected: int = 0
    cut: int = 0
    last_bitmask: torch.Tensor | None = None


@dataclass(frozen=True)
class MaskSettings:
    rows: int
    steps: int
    warmup: int
    seed: int
    max_doc_tokens: int


class RowBook:
    """The harness's bookkeeping for each row: its schema and the tokens of its document."""

    def __init__(self, schemas: Sequence[Schema], vocab: Vocab, result: MaskResult) -> None:
        self.schemas = list(schemas)
        self.tokens: list[list[int]] = [[] for _ in schemas]
        self.vocab = vocab
        self.result = result

    def finish(self, rows: Rows, row: int, by_eos: bool) -> None:
        text = self.vocab.decode(self.tokens[row])
        self.result.documents.append(Document(self.schemas[row], text, by_eos))
        self.result.tokens_per_doc.append(len(self.tokens[row]))
        self.restart(rows, row)

    def restart(self, rows: Rows, row: int) -> None:
        rows.reset(row)
        self.tokens[row].clear()

    def record(self, rows: Rows, tokens: list[int], accepted: list[bool], limit: int) -> None:
        for row, (token, ok) in enumerate(zip(tokens, accepted, strict=True)):
            if not ok:
                self.result.rejected += 1
                self.restart(rows, row)
            elif token == self.vocab.eos:
                self.finish(rows, row, by_eos=True)
            else:
                self.tokens[row].append(token)
                if len(self.tokens[row]) >= limit:
                    self.result.cut += 1
                    self.restart(rows, row)

    def close(self, rows: Rows) -> None:
        """Rows accepting at the end count as documents too (their EOS not yet taken)."""
        for row in range(len(self.schemas)):
            if self.tokens[row] and rows.accepting(row):
                self.finish(rows, row, by_eos=False)


def timed_step(
    rows: Rows, logits: torch.Tensor, bitmask: torch.Tensor
) -> tuple[list[int], list[bool], dict[str, float]]:
    t0 = time.perf_counter()
    rows.fill(bitmask)
    t1 = time.perf_counter()
    rows.apply(logits, bitmask)
    t2 = time.perf_counter()
    tokens: list[int] = logits.argmax(dim=1).tolist()
    t3 = time.perf_counter()
    accepted = rows.advance(tokens)
    t4 = time.perf_counter()
    ms = {"fill": t1 - t0, "apply": t2 - t1, "pick": t3 - t2, "advance": t4 - t3}
    return tokens, accepted, {k: v * 1e3 for k, v in ms.items()}


def run_mask(
    lib: Library, schemas: Sequence[Schema], vocab: Vocab, bias: torch.Tensor, s: MaskSettings
) -> MaskResult:
    row_schemas = [schemas[i % len(schemas)] for i in range(s.rows)]
    rows = lib.rows(row_schemas)
    result = MaskResult()
    book = RowBook(row_schemas, vocab, result)
    bitmask = torch.full((s.rows, words(vocab.size)), -1, dtype=torch.int32)
    logits = torch.empty(s.rows, vocab.size)
    generator = torch.Generator().manual_seed(s.seed)  # same logits for every library
    for step in range(s.warmup + s.steps):
        torch.randn(logits.shape, generator=generator, out=logits)
        logits += bias
        tokens, accepted, ms = timed_step(rows, logits, bitmask)
        if step == 0:
            result.first_step = ms
        if step >= s.warmup:
            for phase, value in ms.items():
                result.times[phase].append(value)
        book.record(rows, tokens, accepted, s.max_doc_tokens)
        if (step + 1) % 25 == 0:
            say(f"{lib.name} mask: step {step + 1}/{s.warmup + s.steps}")
    book.close(rows)
    result.last_bitmask = bitmask
    return result


# ---------------------------------------------------------------- validation


@dataclass
class Validity:
    documents: int = 0
    by_eos: int = 0
    parsed: int = 0
    valid: int = 0
    examples: list[str] = field(default_factory=list)


def validate(documents: Sequence[Document]) -> Validity:
    import jsonschema

    result = Validity(documents=len(documents))
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    for doc in documents:
        result.by_eos += doc.ended_by_eos
        try:
            instance = json.loads(doc.text)
        except json.JSONDecodeError as exc:
            note_invalid(result, doc, f"not JSON: {exc}")
            continue
        result.parsed += 1
        validator = jsonschema.Draft202012Validator(doc.schema.doc, format_checker=checker)
        error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
        if error is None:
            result.valid += 1
        else:
            where = "/".join(str(p) for p in error.absolute_path)
            note_invalid(result, doc, f"at /{where}: {error.message}")
    return result


def note_invalid(result: Validity, doc: Document, why: str) -> None:
    if len(result.examples) < MAX_EXAMPLES:
        result.examples.append(f"{doc.schema.name}: {why[:200]} | text: {doc.text[:160]!r}")


# ---------------------------------------------------------------- apply kernels alone


def time_apply(
    kernel: ApplyFn, logits: torch.Tensor, bitmask: torch.Tensor, calls: int
) -> tuple[float, list[float]]:
    """The first call's ms, then `calls` timed calls, each on a fresh copy of the logits."""
    work = logits.clone()
    started = time.perf_counter()
    kernel(work, bitmask)
    first = ms_since(started)
    times = []
    for _ in range(calls):
        work.copy_(logits)
        started = time.perf_counter()
        kernel(work, bitmask)
        times.append(ms_since(started))
    return first, times


def check_kernel(kernel: ApplyFn, logits: torch.Tensor, bitmask: torch.Tensor) -> bool:
    """Does the kernel mask exactly what the eager reference masks?"""
    want, got = logits.clone(), logits.clone()
    apply_eager(want, bitmask)
    kernel(got, bitmask)
    return bool(torch.equal(torch.isinf(want), torch.isinf(got)))


def measure_apply(
    kernels: dict[str, ApplyFn], bitmask: torch.Tensor, vocab: Vocab, seed: int, calls: int
) -> list[list[str]]:
    generator = torch.Generator().manual_seed(seed + 1)
    logits = torch.randn((bitmask.shape[0], vocab.size), generator=generator)
    table = []
    for name, kernel in kernels.items():
        try:
            first, times = time_apply(kernel, logits, bitmask, calls)
            same = "yes" if check_kernel(kernel, logits, bitmask) else "NO"
        except Exception as exc:  # one kernel failing must not lose the others
            table.append([name, f"failed: {type(exc).__name__}: {exc}"[:80], "", "", "", ""])
            continue
        row = [name, fmt(first), fmt(mean(times)), fmt(percentile(times, 50))]
        table.append([*row, fmt(percentile(times, 99)), same])
        say(f"apply kernel {name}: {mean(times):.2f} ms")
    return table


# ---------------------------------------------------------------- report


def header_lines(
    args: argparse.Namespace, vocab: Vocab, folder: Path, load_at_start: float
) -> list[str]:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    packages = ["torch", "transformers", "llguidance", "xgrammar", "apache-tvm-ffi", "jsonschema"]
    versions = " | ".join(f"{p} {package_version(p)}" for p in packages)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    eos_text = vocab.tokenizer.convert_ids_to_tokens(vocab.eos)
    return [
        f"# grammar libraries, {stamp}, commit {git_commit()}",
        f"command: {shlex.join([sys.executable, *sys.argv])}",
        f"python {platform.python_version()} | {versions}",
        f"CPU: {cpu_model()}; os.cpu_count() {os.cpu_count()}, usable {affinity}; "
        f"--threads {args.threads} (torch intra-op {torch.get_num_threads()}, "
        "LLExecutor, BatchGrammarMatcher and GrammarCompiler max_threads)",
        f"tokenizer: {folder} (vocab {vocab.size}, eos {vocab.eos} {eos_text!r}), "
        f"loaded in {vocab.load_ms:.0f} ms",
        f"load average (1 min): {load_at_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the "
        "end (other work on these CPUs distorts every figure, the torch ones most)",
    ]


def setup_section(libs: Sequence[Library], compiles: dict[str, CompileResult]) -> list[str]:
    rows = [
        [
            lib.name,
            fmt(lib.setup.import_ms, 1),
            fmt(lib.setup.tokenizer_ms, 1),
            fmt(compiles[lib.name].first_trivial_ms, 1) if lib.name in compiles else "-",
        ]
        for lib in libs
    ]
    header = ["library", "import ms", "tokenizer info ms", "first grammar of process ms"]
    return ["", "## setup, once per process", *render_table(header, rows)]


def compile_section(
    schemas: Sequence[Schema], compiles: dict[str, CompileResult], repeats: int
) -> list[str]:
    llg, xgr = compiles.get("llguidance"), compiles.get("xgrammar")
    columns: list[tuple[str, Callable[[str], float | None]]] = []
    if llg:
        columns.append(("llg ttfm", lambda n: llg.per_schema[n].ttfm_ms))
    if xgr:
        columns.append(("xgr compile", lambda n: xgr.per_schema[n].compile_ms))
        columns.append(("xgr ttfm", lambda n: xgr.per_schema[n].ttfm_ms))
    rows = [[s.name, str(len(s.text)), *(fmt(get(s.name)) for _, get in columns)] for s in schemas]
    if xgr:
        header_extra = ["xgr KB"]
        for row, s in zip(rows, schemas, strict=True):
            row.append(fmt(xgr.per_schema[s.name].memory_kb, 0))
    else:
        header_extra = []
    for label, q in (("median", 50.0), ("p90", 90.0), ("max", 100.0)):
        stats = []
        for _, get in columns:
            values = [v for s in schemas if (v := get(s.name)) is not None and not math.isnan(v)]
            stats.append(fmt(percentile(values, q)))
        rows.append([label, "", *stats, *([""] * len(header_extra))])
    header = ["schema", "bytes", *(name for name, _ in columns), *header_extra]
    lines = [
        "",
        f"## compile, cold (fresh compiler, no cache); ms, median of {repeats} per schema",
        "ttfm = time to first mask: grammar + matcher + its first bitmask fill (one row)",
        *render_table(header, rows),
    ]
    for name, result in compiles.items():
        for schema_name, cold in result.per_schema.items():
            if cold.error:
                lines.append(f"error: {name} {schema_name}: {cold.error[:300]}")
    return lines


def phase_row(label: str, phase: str, values: Sequence[float]) -> list[str]:
    stats = [mean(values), percentile(values, 50), percentile(values, 99), percentile(values, 100)]
    return [label, phase, *(fmt(v, 3) for v in stats)]


def mask_section(
    libs: Sequence[Library], results: dict[str, MaskResult], s: MaskSettings, n_schemas: int
) -> list[str]:
    lines = [
        "",
        f"## per step, {s.rows} rows ({n_schemas} schemas round-robin), {s.steps} steps after "
        f"{s.warmup} warm-up; ms per step",
        "total = fill + apply + advance; pick (argmax + tolist, the same code for both) apart",
    ]
    for lib in libs:
        lines += [f"{lib.name}:", *(f"  {p}" for p in lib.paths())]
    rows = []
    for lib in libs:
        times = results[lib.name].times
        parts = zip(times["fill"], times["apply"], times["advance"], strict=True)
        total = [sum(p) for p in parts]
        for i, phase in enumerate(("fill", "apply", "advance")):
            rows.append(phase_row(lib.name if i == 0 else "", phase, times[phase]))
        rows.append(phase_row("", "total", total))
        rows.append(phase_row("", "pick", times["pick"]))
    lines += render_table(["library", "phase", "mean", "p50", "p99", "max"], rows)
    for lib in libs:
        first = results[lib.name].first_step
        lines.append(
            f"first step ({lib.name}, not in the figures): fill {first['fill']:.1f} ms, "
            f"apply {first['apply']:.1f} ms, advance {first['advance']:.1f} ms"
        )
    return lines


def documents_section(results: dict[str, MaskResult], limit: int) -> list[str]:
    rows, notes = [], []
    for name, result in results.items():
        v = validate(result.documents)
        rows.append(
            [
                name,
                str(v.documents),
                str(v.by_eos),
                str(v.parsed),
                str(v.valid),
                str(v.documents - v.valid),
                fmt(mean(result.tokens_per_doc), 1),
                str(result.rejected),
                str(result.cut),
            ]
        )
        notes += [f"invalid ({name}): {e}" for e in v.examples]
    header = [
        "library",
        "documents",
        "by EOS",
        "JSON",
        "valid",
        "invalid",
        "tokens/doc",
        "rejected",
        f"cut at {limit}",
    ]
    return [
        "",
        "## documents (harness check: greedy argmax over random logits, odd but valid JSON)",
        "documents = ended by EOS + accepting at the end; rejected = tokens a matcher refused",
        *render_table(header, rows),
        *notes,
    ]


def apply_section(table: list[list[str]], rows: int, vocab: Vocab, calls: int) -> list[str]:
    return [
        "",
        f"## apply kernels alone, [{rows}, {vocab.size}] float32, the last step's bitmask; "
        f"ms, {calls} calls",
        *render_table(["kernel", "first", "mean", "p50", "p99", "same as eager"], table),
    ]


def write_report(lines: list[str], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"grammar-libs-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--libs", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--schemas", type=int, default=None, help="only the first N schemas")
    parser.add_argument("--schema-dir", type=Path, default=REPO / "bench" / "schemas")
    parser.add_argument("--rows", type=int, default=64, help="constrained rows per step")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="worker threads, every library")
    parser.add_argument("--compile-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--structure-bias", type=float, default=3.0, help='+ on " , : } ], - on whitespace tokens'
    )
    parser.add_argument("--max-doc-tokens", type=int, default=256)
    parser.add_argument("--apply-calls", type=int, default=20)
    parser.add_argument("--tokenizer", type=Path, default=None, help="a folder: tokenizer.json")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    return parser.parse_args(argv)


def compiled_everywhere(
    schemas: Sequence[Schema], compiles: dict[str, CompileResult]
) -> list[Schema]:
    """The schemas that every library compiled without error (the mask run uses only these)."""
    return [s for s in schemas if not any(c.per_schema[s.name].error for c in compiles.values())]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    load_at_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    schemas = load_schemas(args.schema_dir, args.schemas)
    folder = args.tokenizer or default_tokenizer_dir()
    vocab = load_vocab(folder)
    say(f"tokenizer {folder} ({vocab.size} tokens) in {vocab.load_ms:.0f} ms")
    libs = [start_library(name, vocab, args.threads) for name in args.libs]
    compiles = {lib.name: measure_compile(lib, schemas, args.compile_repeats) for lib in libs}
    usable = compiled_everywhere(schemas, compiles)
    if not usable:
        raise SystemExit("no schema compiled in every library: nothing to run the masks on")
    settings = MaskSettings(args.rows, args.steps, args.warmup, args.seed, args.max_doc_tokens)
    bias = structure_bias(vocab, args.structure_bias)
    masks = {lib.name: run_mask(lib, usable, vocab, bias, settings) for lib in libs}
    kernels: dict[str, ApplyFn] = {"torch eager (reference)": apply_eager}
    for lib in libs:
        kernels.update(lib.apply_kernels())
    last = masks[libs[-1].name].last_bitmask
    assert last is not None
    table = measure_apply(kernels, last, vocab, args.seed, args.apply_calls)
    left_out = [s.name for s in schemas if s not in usable]
    lines = [
        *header_lines(args, vocab, folder, load_at_start),
        f"schemas: {len(schemas)} from {args.schema_dir} (mask run without: "
        f"{', '.join(left_out) or 'none'}); seed {args.seed}; structure bias "
        f"{args.structure_bias}; documents cut at {args.max_doc_tokens} tokens",
        *setup_section(libs, compiles),
        *compile_section(schemas, compiles, args.compile_repeats),
        *mask_section(libs, masks, settings, len(usable)),
        *documents_section(masks, args.max_doc_tokens),
        *apply_section(table, args.rows, vocab, args.apply_calls),
    ]
    print("\n".join(lines))
    say(f"written {write_report(lines, args.out)}")


if __name__ == "__main__":
    main()
