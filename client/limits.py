"""The limits the server enforces on each request, so no single request can exhaust it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestLimits:
    default_max_new_tokens: int = 256  # when a request leaves max_new_tokens unset
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 64
    max_bad_words: int = 256
    max_logit_bias: int = 1024
    max_allowed_token_ids: int = 65536
    max_plugins: int = 8
    max_top_logprobs: int = 20
    max_request_id_chars: int = 128
