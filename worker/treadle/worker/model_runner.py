"""One model forward per step for every row of the plan."""

from __future__ import annotations

import torch

from . import attention
from .attention import PagedLayout
from .decode_lanes import DecodeLanes
from .kv_cache import PagedKVCache
from .loader import LoadedModel
from .plan import StepPlan
from .vision import compute_features, embed_with_images


class ModelRunner:
    """Packs a step's tokens, runs the model once and returns the next-token logits.

    The model is switched to the paged attention (`attention.py`) when the
    runner is built; after that it only runs inside treadle steps.
    """

    def __init__(
        self, loaded: LoadedModel, cache: PagedKVCache, lanes: DecodeLanes | None = None
    ) -> None:
        self.model = loaded.model
        self.cache = cache
        self.lanes = lanes
        self.device = loaded.device
        self.dtype = loaded.dtype
        attention.install(self.model)

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Run the plan's tokens; return logits `[N, V]`, row i for `plan.sampled_rows[i]`.

        Applies `plan.copies` to the pool first. The packed sequence is the
        decode rows' tokens (in the layout's reading order), then each prefill
        chunk; every token's KV is written to its row's blocks (and to its
        decode lane, if it has one).
        Only the last token of each row that samples goes through the LM head
        (N may be 0: the KV is still written). A failed step drops every lane.
        """
        try:
            return self._forward(plan)
        except BaseException:
            if self.lanes is not None:  # what the lanes hold is unknown now
                self.lanes.reset()
            raise

    def _forward(self, plan: StepPlan) -> torch.Tensor:
        self.cache.copy(plan.copies)
        layout = PagedLayout.build(self.cache, plan.decode, plan.prefill, self.device, self.lanes)
        packed = [plan.decode[i] for i in layout.decode_order] + plan.prefill
        input_ids: list[int] = []
        last: dict[int, int] = {}  # id(row) -> index of its last token in the packed sequence
        images = []  # (offset in the packed sequence, start, tokens, images) of image chunks
        for r in packed:
            if r.images is not None and r.images.rows(r.start, r.start + len(r.input_ids))[1]:
                images.append((len(input_ids), r.start, len(r.input_ids), r.images))
            input_ids.extend(r.input_ids)
            last[id(r)] = len(input_ids) - 1
        keep = [last[id(r)] for r in plan.sampled_rows]  # logits in the plan's order
        ids = torch.tensor([input_ids], device=self.device)  # [1, T]
        inputs: dict[str, torch.Tensor] = {"input_ids": ids}
        if images:  # the vision tower once per request, then the features in place
            compute_features(self.model, [c[3] for c in images], self.device, self.dtype)
            inputs = {"inputs_embeds": embed_with_images(self.model, ids, images)}
        out = self.model(
            **inputs,
            position_ids=layout.positions.unsqueeze(0),  # [1, T]
            use_cache=False,
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),  # [N]
            treadle_layout=layout,
        )
        return out.logits[0].float()  # [N, V]
