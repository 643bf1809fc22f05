"""The request bodies of the OpenAI-compatible endpoints, as pydantic models.

Every model refuses fields it does not declare (`extra="forbid"`): a field treadle does not
support is a 400 naming it, never silently dropped. The fields marked "ignored" are the ones
OpenAI documents as optional and harmless to leave out (docs/openai.md lists every field).
Ranges are not checked here: the engine checks them and names the field (errors.py maps its
names to OpenAI's). treadle's own controls are extra body fields, the way vLLM takes them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageUrl(Body):
    url: str  # a data: URL (data:image/png;base64,...); the server fetches no other URL
    detail: Literal["auto", "low", "high"] | None = None  # ignored


class ContentPart(BaseModel):
    """A part of a message's content: `text`, or `image_url` holding a data: URL; a part of
    another type is refused by convert.py, naming it."""

    model_config = ConfigDict(extra="allow")  # another type's fields (audio); refused by type

    type: str
    text: str | None = None
    image_url: ImageUrl | None = None


class FunctionCall(Body):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallBody(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # ignored
    refusal: str | None = None  # ignored (echoed back from an earlier answer)
    tool_calls: list[ToolCallBody] | None = None  # an assistant message's calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class FunctionDefinition(Body):
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None  # JSON Schema of the arguments
    strict: bool | None = None  # ignored: calls are always constrained to the schema


class ToolBody(Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaBody(Body):
    name: str
    description: str | None = None  # ignored
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # ignored: the output always follows the schema


class ResponseFormatBody(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaBody | None = None


class StreamOptions(Body):
    include_usage: bool = False


class PluginBody(Body):
    name: str
    args: dict[str, Any] = Field(default_factory=dict)


class CommonRequest(Body):
    """The fields both endpoints take."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # None: 1.0, OpenAI's default
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None  # token id (as text) -> bias
    user: str | None = None  # ignored
    # treadle's own controls (extra body fields)
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    stop_token_sequences: list[list[int]] | None = None
    plugins: list[PluginBody] | None = None
    priority: int = 0


class ChatCompletionRequest(CommonRequest):
    messages: list[Message]
    max_completion_tokens: int | None = None  # wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormatBody | None = None
    tools: list[ToolBody] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # ignored: a model may make several calls
    store: bool | None = None  # ignored: nothing is stored
    metadata: dict[str, str] | None = None  # ignored (goes with store)


# One prompt (text or token ids), or a batch of them.
Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(CommonRequest):
    prompt: Prompt
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None  # alternatives per token (0: the chosen token's only)
    echo: bool = False  # refused when true
    best_of: int | None = None  # refused unless it equals n
    suffix: str | None = None  # refused when set
