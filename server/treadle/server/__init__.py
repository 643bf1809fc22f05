"""treadle's frontends: the gRPC service and server lifecycle (drain), auth, proto
conversion, the status-code mapping, metrics exposition and `treadle serve`.

Layers point one way: server -> scheduler -> worker; nothing below imports this package.
"""
