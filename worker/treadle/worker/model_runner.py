"""One model forward per step for every row of the plan."""

from __future__ import annotations

import torch

from . import attention
from .attention import Segment, SlotLayout
from .kv_cache import SlotKVCache
from .loader import LoadedModel
from .plan import StepPlan


class ModelRunner:
    """Packs a step's tokens, runs the model once and returns the next-token logits.

    The model is switched to the slot attention (`attention.py`) when the
    runner is built; after that it only runs inside treadle steps.
    """

    def __init__(self, loaded: LoadedModel, cache: SlotKVCache) -> None:
        self.model = loaded.model
        self.cache = cache
        self.device = loaded.device
        attention.install(self.model)

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Run the plan's tokens; return logits `[N, V]`, row i for `plan.rows[i]`.

        Applies `plan.moves` to the cache first. Decode rows contribute their
        one token, prefill rows their prompt; only the last token of each row
        goes through the LM head.
        """
        self.cache.move(plan.moves)
        input_ids: list[int] = [r.input_ids[-1] for r in plan.decode]
        segments: list[Segment] = []
        for r in plan.prefill:
            segments.append(Segment(r.row, r.start, len(r.input_ids), len(input_ids)))
            input_ids.extend(r.input_ids)
        layout = SlotLayout.build(self.cache, [r.start for r in plan.decode], segments, self.device)
        # Index in the packed sequence of each row's last token: decode tokens, then segment ends.
        last = list(range(len(plan.decode))) + [s.offset + s.length - 1 for s in segments]
        out = self.model(
            input_ids=torch.tensor([input_ids], device=self.device),  # [1, T]
            position_ids=layout.positions.unsqueeze(0),  # [1, T]
            use_cache=False,
            logits_to_keep=torch.tensor(last, device=self.device),  # [N]
            treadle_layout=layout,
        )
        return out.logits[0].float()  # [N, V]
