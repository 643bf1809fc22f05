"""The OpenAI-compatible HTTP frontend: a second door into the same engine (docs/openai.md).

protocol.py  the request bodies (pydantic; unknown fields are refused)
convert.py   a body -> the engine's GenerationRequest(s)
errors.py    OpenAI's error shape and the HTTP status of every refusal, in one place
pieces.py    token text and bytes for logprobs
results.py   events -> choices, logprobs and usage (whole responses)
streaming.py events -> server-sent event chunks
requests.py  one HTTP request's engine streams, merged
app.py       the Starlette routes
listener.py  uvicorn on treadle's event loop, its socket, TLS and drain
"""
