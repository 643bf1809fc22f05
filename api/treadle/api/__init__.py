"""The API's concepts in plain Python, shared by the SDK and the server.

Torch-free and free of the generated stubs: generation parameters and their
checks, the limits a server enforces, finish reasons, usage and logprobs.
Every layer may import it; it imports nothing else of treadle.
"""
