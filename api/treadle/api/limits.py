"""The limits the server enforces on each request, so no single request can exhaust it.

Torch-free: the SDK checks what it can against the same numbers (ModelInfo
reports them). Every limit bounds a cost that grows with the request: memory
held per request, work before the request is queued, or work per step.
"""

from __future__ import annotations

from dataclasses import dataclass

PROMPT_CHARS_PER_TOKEN = 32  # generous: few tokens of any tokenizer are longer


@dataclass(frozen=True, slots=True)
class RequestLimits:
    default_max_new_tokens: int = 256  # when a request leaves max_new_tokens unset
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 64
    max_stop_token_sequences: int = 16
    max_stop_token_sequence_len: int = 64  # tokens in each
    max_bad_words: int = 256  # bad_words + bad_words_ids entries
    max_bad_word_chars: int = 256  # each bad word, before it is tokenized
    max_bad_words_tokens: int = 4096  # all bad-word sequences together, variants included
    max_logit_bias: int = 1024
    max_allowed_token_ids: int = 65536
    max_plugins: int = 8
    max_plugin_name_bytes: int = 64  # each plugins[i].name, UTF-8 bytes; names are echoed
    max_plugin_args_bytes: int = 16384  # each plugin's args_json, UTF-8 bytes
    max_plugin_args_depth: int = 32  # nesting of arrays and objects in args_json
    max_top_logprobs: int = 20
    max_samples: int = 16  # n: samples of one prompt
    max_response_format_bytes: int = 65536  # schema, regex or grammar (or all choices), UTF-8
    max_response_format_choices: int = 1024  # entries of a choice format
    response_format_compile_seconds: float = 10.0  # a grammar taking longer is refused
    max_tools: int = 128  # tools offered by one chat
    max_tools_bytes: int = 131072  # their names, descriptions and parameters, UTF-8
    max_images: int = 8  # images in one request's chat
    max_image_bytes: int = 4 * 2**20  # each image, encoded
    max_image_pixels: int = 4096 * 4096  # each image, decoded (width x height)
    max_request_id_bytes: int = 256  # UTF-8 bytes; the id is echoed in every event
    max_prompt_chars: int | None = None  # prompt or chat characters; None: derived (below)
    max_chat_messages: int = 1024
    max_priority: int = 10  # |priority| at most this; equal priorities are served FIFO
    max_session_requests: int = 64  # requests in flight on one Session
    max_stream_backlog: int = 1024  # undelivered events of one request before it is cut

    def prompt_chars(self, max_total_tokens: int) -> int:
        """The character cap of a prompt (or a chat's roles and contents together),
        checked before tokenizing: `max_prompt_chars`, or the context in tokens
        times `PROMPT_CHARS_PER_TOKEN`."""
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        return max_total_tokens * PROMPT_CHARS_PER_TOKEN
