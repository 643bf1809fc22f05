"""treadle's control plane: the engine (queue, admission, step loop, stopping,
detokenization, prefix reuse) and request validation. The frontends live in
treadle.server.
"""
