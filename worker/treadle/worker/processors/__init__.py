"""Logits processing: everything between the model's logits and the token choice.

`LogitsPipeline` applies each row's processors, plugins and warpers to a
batch (see `pipeline.py` for the order); one module per kind of stage.
"""

from .pipeline import LogitsPipeline, ProcessedLogits

__all__ = ["LogitsPipeline", "ProcessedLogits"]
