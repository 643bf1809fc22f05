"""Keep the garbage collector's full passes short while serving.

CPython's cyclic collector walks every tracked object on a full (oldest
generation) pass, with the GIL held. A loaded engine tracks hundreds of
thousands of objects (the model's modules, the tokenizer, torch and
transformers themselves): measured during W3, a full pass on the event-loop
thread took up to 124 ms, and the step thread, which needs the GIL between
torch calls, waited that long, so a stream's gap stretched by as much.

At engine start everything then alive is collected once and moved to the
permanent generation (`gc.freeze`), which later passes skip: they walk only
what serving creates. vLLM (`freeze_gc_heap` after warm-up) and SGLang
(`freeze_gc`) do the same. Frozen objects are still freed by reference
counting; only cycles among them are no longer collected.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("treadle.scheduler")


def freeze_startup_objects() -> int:
    """Collect, then freeze every object alive now; return how many are frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze %d startup objects out of the garbage collector's full passes", frozen)
    return frozen
