"""treadle's control plane: the engine (queue, admission, step loop, stopping,
detokenization), request validation, the gRPC service, metrics and `treadle serve`.
"""
