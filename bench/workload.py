"""The W1 workload: chat requests with their own budgets, and the figures derived from them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treadle.scheduler.generation_request import ChatMessage, GenerationRequest


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One request of the workload, as the file states it."""

    id: str
    messages: tuple[ChatMessage, ...]
    max_new_tokens: int  # generated exactly (EOS ignored)

    def as_dicts(self) -> list[dict[str, str]]:
        """The messages as a chat template expects them."""
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def generation_request(self) -> GenerationRequest:
        """The engine request for this item: greedy, EOS ignored, exactly its budget."""
        return GenerationRequest(
            messages=list(self.messages),
            max_new_tokens=self.max_new_tokens,
            ignore_eos=True,
            request_id=self.id,
        )


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests in arrival (file) order, with their prompts rendered for one tokenizer."""

    path: str
    items: tuple[WorkItem, ...]
    prompts: tuple[tuple[int, ...], ...]  # prompt token ids, one per item

    @property
    def budgets(self) -> list[int]:
        return [item.max_new_tokens for item in self.items]

    @property
    def useful_tokens(self) -> int:
        """What the workload asks for: the sum of the budgets."""
        return sum(self.budgets)

    @property
    def mean_prompt_tokens(self) -> float:
        return sum(len(p) for p in self.prompts) / len(self.prompts)

    @property
    def mean_decode_context(self) -> float:
        """Token-weighted mean context of a generated token (see `mean_decode_context`)."""
        return mean_decode_context([len(p) for p in self.prompts], self.budgets)

    def head(self, n: int) -> Workload:
        """The first `n` requests (all of them if `n` exceeds the count)."""
        return Workload(self.path, self.items[:n], self.prompts[:n])

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "requests": len(self.items),
            "useful_tokens": self.useful_tokens,
            "prompt_tokens": {
                "mean": round(self.mean_prompt_tokens, 2),
                "min": min(len(p) for p in self.prompts),
                "max": max(len(p) for p in self.prompts),
            },
            "max_new_tokens": {"min": min(self.budgets), "max": max(self.budgets)},
            "mean_decode_context": round(self.mean_decode_context, 2),
        }


def mean_decode_context(prompt_lens: list[int], budgets: list[int]) -> float:
    """The mean, over every generated token, of prompt length + its index within its budget.

    Token j (0-based) of a request with a p-token prompt is chosen after the
    model has seen p + j tokens, so the mean of a request is p + (b - 1) / 2,
    weighted by its budget b.
    """
    total = sum(budgets)
    if total == 0:
        raise ValueError("budgets: the workload generates no tokens")
    weighted = sum(b * (p + (b - 1) / 2) for p, b in zip(prompt_lens, budgets, strict=True))
    return weighted / total


def default_workload_path(repo: Path) -> Path:
    """Where the standard workloads live: `<repo>/../shared/workloads/w1.json`."""
    return repo.parent / "shared" / "workloads" / "w1.json"


def read_items(path: Path) -> list[WorkItem]:
    """Parse the workload file; raises ValueError naming the bad request."""
    data = json.loads(path.read_text())
    items = []
    for i, raw in enumerate(data["requests"]):
        budget = raw.get("max_new_tokens")
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"{path}: requests[{i}].max_new_tokens must be a positive integer")
        messages = tuple(ChatMessage(m["role"], m["content"]) for m in raw["messages"])
        items.append(WorkItem(str(raw.get("id", f"req-{i}")), messages, budget))
    return items


def render_prompt(tokenizer: Any, item: WorkItem) -> list[int]:
    """The prompt ids the engine builds for `item`: chat template, then no special tokens."""
    text = tokenizer.apply_chat_template(
        item.as_dicts(), add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])


def load_workload(path: Path, tokenizer: Any, limit: int | None = None) -> Workload:
    """The first `limit` requests of the file (all if None), prompts rendered with `tokenizer`."""
    items = read_items(path)[:limit]
    if not items:
        raise ValueError(f"{path}: no requests selected")
    prompts = tuple(tuple(render_prompt(tokenizer, item)) for item in items)
    return Workload(str(path), tuple(items), prompts)
