"""treadle's data plane: model loading, the slot KV cache, the batched forward,
logits processing, sampling and plugins. Its contract with the scheduler is
`plan.py`; nothing here knows about gRPC, asyncio or requests.
"""
