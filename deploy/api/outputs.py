"""Request and response fields of structured outputs and tool calls, shaped as OpenAI and vLLM send them
(`protocol.py` holds the requests that carry them; `admission.py` and `tools.py` act on them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send more than these fields: ignored


class JsonSchemaFormat(Lenient):
    name: str = Field(description="The schema's name (OpenAI requires one).")
    description: str | None = None
    json_schema: dict[str, Any] | bool | None = Field(None, alias="schema", description="The JSON schema.")
    strict: bool | None = Field(None, description="Always enforced: the output is decoded under the schema.")


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"] = Field(description="`text` = no constraint.")
    json_schema: JsonSchemaFormat | None = Field(None, description="With type `json_schema`.")


class StructuredOutputs(Lenient):
    """vLLM's `structured_outputs`: one of these constrains the output."""

    json_: dict[str, Any] | str | bool | None = Field(None, alias="json", description="A JSON schema.")
    regex: str | None = Field(None, description="A regular expression the whole output matches.")
    choice: list[str] | None = Field(None, description="The output is one of these strings.")
    grammar: str | None = Field(None, description="An EBNF (GBNF) or Lark grammar.")
    json_object: bool | None = Field(None, description="Any JSON object.")


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON object in a string, as OpenAI sends them.")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(Lenient):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="The function's name.")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments.")
    strict: bool | None = None


class Tool(Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(Lenient):
    name: str


class NamedToolChoice(Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str = ""


class DeltaToolCall(BaseModel):
    """A streamed tool call: the first delta of call `index` has its id and name, the next ones append
    to its arguments (OpenAI's stream shape)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction
