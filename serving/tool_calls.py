"""Tool-call formats of the models we serve: prompt rendering, the grammar that forces a call, and
parsers for whole and streamed output.

- `hermes` (the embedded SmolLM2 model and the default): `<tool_call>\\n{"name": ..., "arguments":
  {...}}\\n</tool_call>`, one block per call.
- `glm` (GLM-5, the GLM-4.5/4.7 family): `<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V
  </arg_value>\\n</tool_call>`; string values are raw text, others JSON.
- `dsml` (DeepSeek-V3.2): `<｜DSML｜function_calls>` holding `<｜DSML｜invoke name="NAME">`
  blocks of `<｜DSML｜parameter name="K" string="true|false">V</｜DSML｜parameter>`.

`tool_choice: required` or a named function compiles the format into a Lark grammar for
llguidance (arguments by the function's JSON schema through `%json{...}`), so the call is well
formed whatever the model; `auto` leaves the model free and parses what it wrote.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self, index: int | None = None) -> dict[str, Any]:
        d = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return d if index is None else {"index": index, **d}


def _lark_str(s: str) -> str:
    return json.dumps(s)


def _free_text(sub: dict[str, Any]) -> bool:
    """A string parameter with no constraint: written raw (GLM/DSML), matched by /[^<]*/."""
    return sub.get("type") == "string" and set(sub) <= {"type", "description", "title"}


def _params(fn) -> dict[str, Any]:
    p = fn.parameters or {}
    return p if p else {"type": "object", "properties": {}}


class ToolFormat:
    name = "base"
    start = ""  # the text that opens the tool-call section
    end = ""  # the text that closes one call (streaming emits a call when it appears)

    def __init__(self, specials: dict[str, int] | None = None):
        self.specials = specials or {}  # special-token text -> id (markers that are one token)

    def lit(self, text: str) -> str:
        """A Lark literal: a special token by id when the marker is one, else the text."""
        tid = self.specials.get(text)
        return f"<[{tid}]>" if tid is not None else _lark_str(text)

    # -- prompts (templates that know nothing of tools) -----------------------------------
    def system_prompt(self, tools: list) -> str:
        specs = "\n".join(
            json.dumps(
                {"name": t.name, "description": t.description or "", "parameters": _params(t)}
            )
            for t in tools
        )
        return (
            "You may call functions. Available functions:\n"
            f"{specs}\n"
            f"To call one, answer with:\n{self.render_call('NAME', {'ARG': 'VALUE'})}"
        )

    def render_call(self, name: str, args: dict[str, Any]) -> str:
        raise NotImplementedError

    # -- grammar ---------------------------------------------------------------------------
    def grammar(self, tools: list, parallel: bool) -> str:
        """Lark: one call (or several if parallel) of one of `tools`, then the end of output."""
        calls = " | ".join(f"call_{i}" for i in range(len(tools)))
        rules = "\n".join(self._call_rule(f"call_{i}", t) for i, t in enumerate(tools))
        rep = f"({calls})+" if parallel else f"({calls})"
        return f"start: {rep}\n{rules}\n"

    def _call_rule(self, rule: str, fn) -> str:
        raise NotImplementedError

    # -- parsing -----------------------------------------------------------------------------
    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content before the calls, calls); no calls when the text has none or they are
        malformed (then all of it is content)."""
        i = text.find(self.start)
        if i < 0:
            return text, []
        try:
            calls = self._parse_calls(text[i:])
        except (ValueError, KeyError, TypeError):
            return text, []
        return (text[:i].rstrip() if calls else text), calls

    def _parse_calls(self, text: str) -> list[ToolCall]:
        raise NotImplementedError


class HermesFormat(ToolFormat):
    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def render_call(self, name, args):
        return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"

    def _call_rule(self, rule, fn):
        schema = {
            "type": "object",
            "properties": {"name": {"const": fn.name}, "arguments": _params(fn)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        return (
            f'{rule}: {self.lit(self.start)} "\\n" %json{json.dumps(schema)} "\\n" '
            f"{self.lit(self.end)}"
        )

    def _parse_calls(self, text):
        calls = []
        for body in self._block.findall(text):
            obj = json.loads(body)
            for c in obj if isinstance(obj, list) else [obj]:
                args = c.get("arguments", {})
                calls.append(
                    ToolCall(c["name"], args if isinstance(args, str) else json.dumps(args))
                )
        return calls


class GLMFormat(ToolFormat):
    name = "glm"
    start, end = "<tool_call>", "</tool_call>"
    _block = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
    _arg = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)

    def render_call(self, name, args):
        body = "".join(
            f"\n<arg_key>{k}</arg_key>\n<arg_value>"
            f"{v if isinstance(v, str) else json.dumps(v)}</arg_value>"
            for k, v in args.items()
        )
        return f"<tool_call>{name}{body}\n</tool_call>"

    def _call_rule(self, rule, fn):
        params = _params(fn)
        required = set(params.get("required", ()))
        parts = []
        for k, sub in (params.get("properties") or {}).items():
            value = "/[^<]*/" if _free_text(sub) else f"%json{json.dumps(sub)}"
            arg = (
                f'"\\n" {self.lit("<arg_key>")} {_lark_str(k)} {self.lit("</arg_key>")} "\\n" '
                f"{self.lit('<arg_value>')} {value} {self.lit('</arg_value>')}"
            )
            parts.append(f"({arg})" if k in required else f"({arg})?")
        return (
            f"{rule}: {self.lit(self.start)} {_lark_str(fn.name)} {' '.join(parts)} "
            f'"\\n" {self.lit(self.end)}'
        )

    def _parse_calls(self, text):
        calls = []
        for body in self._block.findall(text):
            name, _, rest = body.partition("<arg_key>")
            rest = "<arg_key>" + rest if rest else ""
            args = {k.strip(): _value(v) for k, v in self._arg.findall(rest)}
            if not name.strip():
                raise ValueError("tool call without a name")
            calls.append(ToolCall(name.strip(), json.dumps(args)))
        return calls


class DSMLFormat(ToolFormat):
    name = "dsml"
    T = "｜DSML｜"
    start = f"<{T}function_calls>"
    end = f"</{T}invoke>"
    _invoke = re.compile(rf'<{T}invoke name="(.*?)">(.*?)</{T}invoke>', re.DOTALL)
    _param = re.compile(
        rf'<{T}parameter name="(.*?)" string="(true|false)">(.*?)</{T}parameter>', re.DOTALL
    )

    def render_call(self, name, args):
        t = self.T
        params = "".join(
            f'<{t}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f"{v if isinstance(v, str) else json.dumps(v)}</{t}parameter>\n"
            for k, v in args.items()
        )
        return (
            f'{self.start}\n<{t}invoke name="{name}">\n{params}</{t}invoke>\n</{t}function_calls>'
        )

    def grammar(self, tools, parallel):
        calls = " | ".join(f"call_{i}" for i in range(len(tools)))
        rules = "\n".join(self._call_rule(f"call_{i}", t) for i, t in enumerate(tools))
        rep = f"({calls})+" if parallel else f"({calls})"
        close = self.lit(f"</{self.T}function_calls>")
        return f'start: {self.lit(self.start)} "\\n" {rep} {close}\n{rules}\n'

    def _call_rule(self, rule, fn):
        t = self.T
        params = _params(fn)
        required = set(params.get("required", ()))
        parts = []
        for k, sub in (params.get("properties") or {}).items():
            is_str = _free_text(sub)
            value = "/[^<]*/" if is_str else f"%json{json.dumps(sub)}"
            head = f'<{t}parameter name="{k}" string="{"true" if is_str else "false"}">'
            arg = f'{_lark_str(head)} {value} {_lark_str(f"</{t}parameter>")} "\\n"'
            parts.append(f"({arg})" if k in required else f"({arg})?")
        head = _lark_str(f'<{t}invoke name="{fn.name}">\n')
        return f'{rule}: {head} {" ".join(parts)} {_lark_str(f"</{t}invoke>")} "\\n"'

    def _parse_calls(self, text):
        calls = []
        for name, body in self._invoke.findall(text):
            args = {
                k: (v if s == "true" else json.loads(v)) for k, s, v in self._param.findall(body)
            }
            calls.append(ToolCall(name, json.dumps(args)))
        return calls


def _value(v: str) -> Any:
    v = v.strip("\n")
    try:
        return json.loads(v)
    except ValueError:
        return v


FORMATS = {f.name: f for f in (HermesFormat, GLMFormat, DSMLFormat)}
BY_MODEL_TYPE = {"deepseek_v32": "dsml", "glm_moe_dsa": "glm"}


def tool_format(name: str, model_type: str | None, specials: dict[str, int]) -> ToolFormat:
    """`name` auto: by the checkpoint's model_type (hermes for the others)."""
    if name == "auto":
        name = BY_MODEL_TYPE.get(model_type or "", "hermes")
    return FORMATS[name](specials)


class ToolStreamParser:
    """Splits streamed text into content deltas and completed tool calls. Text that may be the
    start of the tool section is held back; once the section starts, each call is emitted as
    its closing marker arrives (and whatever is left is parsed at the end)."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.buf = ""
        self.in_calls = False
        self.emitted = 0  # calls handed out
        self.calls: list[ToolCall] = []

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self.buf += text
        content = ""
        if not self.in_calls:
            i = self.buf.find(self.fmt.start)
            if i >= 0:
                content, self.buf, self.in_calls = self.buf[:i], self.buf[i:], True
            elif final:
                content, self.buf = self.buf, ""
            else:
                keep = _partial_suffix(self.buf, self.fmt.start)
                content, self.buf = (
                    self.buf[: len(self.buf) - keep],
                    self.buf[len(self.buf) - keep :],
                )
        new: list[ToolCall] = []
        if self.in_calls and (final or self.fmt.end in self.buf):
            try:
                parsed = self.fmt._parse_calls(self.buf)
            except (ValueError, KeyError, TypeError):
                parsed = []
            new = parsed[self.emitted :]
            self.emitted = len(parsed)
            self.calls.extend(new)
            if final and not parsed:  # not a well-formed call after all: it was content
                content += self.buf
                self.buf = ""
        return content, new


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
