"""What a chat request asks the output to be, as one llguidance grammar for the engine:
`response_format` json_object / json_schema, or a forced tool call (`tool_choice: required` or a
named function, in the model's tool-call format). Compiled and checked here, at the edge, so a
schema the grammar library cannot handle is a 400 naming the field and never reaches an engine.
"""

from __future__ import annotations

import json
from typing import Any

from serving.errors import BadRequest
from serving.openai_schema import ChatCompletionRequest, FunctionDef
from serving.tool_calls import ToolFormat

# Compact JSON: a free-whitespace grammar lets a weak model pad forever.
_JSON_OPTIONS = {"whitespace_flexible": False}


def _json_grammar(schema: dict[str, Any] | bool) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)


def tool_plan(req: ChatCompletionRequest) -> tuple[list[FunctionDef], str, str | None]:
    """(tools offered, mode auto|none|required|named, forced function name)."""
    tools = req.function_tools()
    # the deprecated function_call is tool_choice's older name; errors name the field sent
    field = "tool_choice" if req.tool_choice is not None else "function_call"
    choice = req.tool_choice if req.tool_choice is not None else req.function_call
    if choice is None:
        return tools, ("auto" if tools else "none"), None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise BadRequest(
                f"{field} must be none, auto, required or a function, got {choice!r}",
                param=field,
                code="invalid_value",
            )
        if choice == "required" and not tools:
            raise BadRequest(f"{field} 'required' needs tools", param=field, code="invalid_value")
        return tools, choice, None
    kind = choice.get("type", "function")
    if kind == "allowed_tools":
        allowed = choice.get("allowed_tools") or {}
        names = {
            t.get("function", {}).get("name") or t.get("name") for t in allowed.get("tools", [])
        }
        tools = [t for t in tools if t.name in names]
        mode = allowed.get("mode", "auto")
        return tools, ("required" if mode == "required" and tools else "auto"), None
    if kind != "function" and "name" not in choice:
        raise BadRequest(
            "custom tool choices are not supported",
            param=field,
            code="unsupported_parameter",
        )
    name = (choice.get("function") or {}).get("name") or choice.get("name")
    match = [t for t in tools if t.name == name]
    if not match:
        raise BadRequest(
            f"{field} names function {name!r}, which is not in tools",
            param=field,
            code="invalid_value",
        )
    return match, "named", name


def request_grammar(
    req: ChatCompletionRequest, fmt: ToolFormat, tools: list[FunctionDef], mode: str
) -> tuple[str | None, str | None]:
    """(grammar or None, the request field it comes from)."""
    if mode in ("required", "named"):
        parallel = mode == "required" and req.parallel_tool_calls is not False
        import llguidance

        return llguidance.LLMatcher.grammar_from_lark(fmt.grammar(tools, parallel)), "tools"
    rf = req.response_format
    if not rf:
        return None, None
    kind = rf.get("type")
    if kind == "text":
        return None, None
    if kind == "json_object":
        return _json_grammar({"type": "object"}), "response_format"
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("name"), str):
            raise BadRequest(
                "response_format.json_schema must be an object with a name",
                param="response_format.json_schema",
                code="invalid_value",
            )
        schema = js.get("schema", {})
        if not isinstance(schema, dict):
            raise BadRequest(
                "response_format.json_schema.schema must be an object",
                param="response_format.json_schema.schema",
                code="invalid_value",
            )
        try:
            return _json_grammar(schema), "response_format.json_schema.schema"
        except ValueError as e:
            raise BadRequest(
                f"response_format.json_schema.schema: {e}",
                param="response_format.json_schema.schema",
                code="invalid_value",
            ) from e
    raise BadRequest(
        f"response_format type must be text, json_object or json_schema, got {kind!r}",
        param="response_format",
        code="invalid_value",
    )


def check(grammar: str, param: str, lltok) -> None:
    from serving.engine.grammar import check_grammar

    err = check_grammar(grammar, lltok)
    if err:
        raise BadRequest(
            f"{param}: the schema cannot be enforced: {err.splitlines()[0][:300]}",
            param=param,
            code="unsupported_parameter",
        )


def dumps_args(args: Any) -> str:
    return args if isinstance(args, str) else json.dumps(args)
