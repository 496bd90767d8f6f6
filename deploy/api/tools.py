"""Tool calls for Mistral-format models: the constraint `tool_choice` asks for, and the answer's parsing.

The prompt carries the tools as mistral-common renders them (`Tokenizer.encode_chat`); a model answers a
call as `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`. As vLLM does for `tool_choice`:
- `"required"`: the output is constrained to that JSON list, each entry one of the tools with its
  parameters' schema (at most one entry when `parallel_tool_calls` is false);
- a named function: the output is constrained to that function's parameters schema: it IS the arguments;
- `"auto"` (the default with tools): free output; one that starts with the `[TOOL_CALLS]` token and
  parses as the list above is returned as tool calls, anything else as content;
- `"none"`: no tool calls (the tools are still in the prompt, as vLLM renders them by default).

A choice with tool calls has `message.tool_calls` (ids of 9 letters and digits, which mistral-common's
validator wants when they come back in the history), `content: null`, `finish_reason: "tool_calls"`.
Streams send `delta.tool_calls`: a named call streams its arguments as they come; `required` and
`auto` calls are sent whole when the output ends (the list must parse first).
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from typing import Any

from moray.deploy.api.errors import APIError
from moray.deploy.api.outputs import DeltaFunction, DeltaToolCall, FunctionCall, NamedToolChoice, ToolCall
from moray.deploy.api.protocol import ChatCompletionRequest, ChatDelta
from moray.model.engine import TokenEvent
from moray.model.structured import Constraint

ID_ALPHABET = string.ascii_letters + string.digits
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def call_id() -> str:
    """A tool call id as Mistral's format wants it (9 letters and digits)."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(9))


def tool_constraint(req: ChatCompletionRequest) -> Constraint | None:
    """The grammar `tool_choice` asks for (None: free output); 400 for a choice that names no tool."""
    choice, tools = req.tool_choice, req.tools or []
    if choice in (None, "none", "auto"):
        return None
    if not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    schemas = {t.function.name: t.function.parameters or ANY_OBJECT for t in tools}
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in schemas:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not in "
                                f"tools ({', '.join(sorted(schemas))})", param="tool_choice")
        return Constraint.json_schema(schemas[choice.function.name])
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, schema in schemas.items()]
    array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not req.parallel_tool_calls:
        array["maxItems"] = 1
    return Constraint.json_schema(array)


def parse_calls(text: str) -> list[ToolCall] | None:
    """`[{"name", "arguments"}, ...]` as tool calls; None when the text is not such a list."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", {})
        calls.append(ToolCall(id=call_id(), function=FunctionCall(
            name=item["name"], arguments=arguments if isinstance(arguments, str) else json.dumps(arguments))))
    return calls


@dataclass
class ToolAnswer:
    """How one choice's output becomes a message: tool calls or content."""

    req: ChatCompletionRequest
    tool_calls_id: int | None  # the tokenizer's [TOOL_CALLS] token, None without one

    @property
    def named(self) -> str | None:
        choice = self.req.tool_choice
        return choice.function.name if isinstance(choice, NamedToolChoice) else None

    @property
    def active(self) -> bool:
        return bool(self.req.tools) and self.req.tool_choice != "none"

    def calls(self, text: str, events: list[TokenEvent], finish: str | None) -> list[ToolCall] | None:
        """The tool calls of a finished output, or None (then it is content)."""
        if not self.active or finish != "stop":
            return None
        if self.named is not None:
            return [ToolCall(id=call_id(), function=FunctionCall(name=self.named, arguments=text))]
        if self.req.tool_choice == "required" or self._opens_a_call(events):
            return parse_calls(text)
        return None

    def _opens_a_call(self, events: list[TokenEvent]) -> bool:
        return bool(events) and self.tool_calls_id is not None and events[0].token_id == self.tool_calls_id

    def buffers(self, first: TokenEvent) -> bool:
        """Whether a stream holds this choice's text back until the end (a list of calls to parse)."""
        if not self.active or self.named is not None:
            return False
        return self.req.tool_choice == "required" or self._opens_a_call([first])

    def named_delta(self, first: bool, text: str) -> list[DeltaToolCall]:
        """A named call's stream: id and name first, then the arguments as they come."""
        if first:
            return [DeltaToolCall(index=0, id=call_id(), type="function",
                                  function=DeltaFunction(name=self.named, arguments=text))]
        return [DeltaToolCall(index=0, function=DeltaFunction(arguments=text))]


def whole_deltas(calls: list[ToolCall]) -> list[DeltaToolCall]:
    return [DeltaToolCall(index=i, id=c.id, type="function",
                          function=DeltaFunction(name=c.function.name, arguments=c.function.arguments))
            for i, c in enumerate(calls)]


class ToolStream:
    """One streamed chat response: what each choice's event sends."""

    def __init__(self, answer: ToolAnswer) -> None:
        self.answer, self.held = answer, set[int]()

    def step(self, index: int, text: str, events: list[TokenEvent], event: TokenEvent,
             first: bool) -> tuple[ChatDelta | None, str | None]:
        """The delta for `event` of choice `index` (whose `text` and `events` include it; None: send
        nothing yet) and the finish reason to send with the choice's last chunk."""
        if first and self.answer.buffers(event):
            self.held.add(index)
        finish = event.finish_reason
        if index in self.held:
            if finish is None:
                return None, None
            calls = self.answer.calls(text, events, finish)
            return (ChatDelta(tool_calls=whole_deltas(calls)), "tool_calls") if calls else \
                (ChatDelta(content=text), finish)
        if self.answer.active and self.answer.named is not None:
            delta = ChatDelta(tool_calls=self.answer.named_delta(first, event.text))
            return delta, "tool_calls" if finish == "stop" else finish
        return ChatDelta(content=event.text), finish
