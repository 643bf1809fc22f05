"""Tool calling: the functions a chat offers the model, which of them it may call, its calls.

Torch-free and shared by the SDK and the server: the SDK checks sizes before
sending, the server checks the same numbers before rendering anything. How
tools reach the prompt and how calls are parsed and constrained is the
server's (docs/tools.md); the checks are in checks.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOOL_CHOICE_TYPES = ("none", "auto", "required", "function")
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call of a tool: parsed from the model's output, or made earlier in a chat."""

    id: str  # "call_..." when the server parsed it; echoed by the tool message answering it
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call."""

    name: str  # 1-64 of A-Z a-z 0-9 _ -
    description: str = ""
    parameters: str = ""  # JSON Schema of the arguments (a JSON object), as text; "": none


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """Whether and which tools the model calls; `type` is one of TOOL_CHOICE_TYPES.

    - none: no call is made (the tools are still shown to the model);
    - auto: the model answers in text or calls tools; a call it starts is constrained to
      a valid call of one of the tools from its opening marker on;
    - required: the output is one or more calls, each valid for one of the tools;
    - function: the output is exactly one call of the tool `name`.
    """

    type: str = "auto"
    name: str = ""  # for type "function"
