"""OpenAI response JSON for one request: whole responses, stream chunks, usage, logprobs.

Shapes follow the official schema (tests validate them against the pinned spec): chat messages
carry `refusal`, logprobs objects carry `content` and `refusal`, `bytes` are the token's own
UTF-8 bytes (a token may hold part of a character: then `token` is vLLM's `bytes:\\xNN` form).
Tokens that are not part of the text (EOS, other special tokens) are left out of logprobs.
Completions with `echo` and `logprobs` list the prompt's tokens first, as OpenAI and vLLM do: the
first prompt token has `null` logprobs (nothing predicts it), a null the spec's types omit.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from serving.openai_schema import Usage
from serving.tool_calls import ToolCall


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: list | None = None  # engine Logprobs
    tool_calls: list[ToolCall] = field(default_factory=list)
    echo: str = ""
    prompt_logprobs: list | None = None  # (token id, engine Logprob or None) per prompt token


class ResponseBuilder:
    def __init__(
        self,
        chat: bool,
        model: str,
        tokenizer,
        lltok=None,
        hidden_ids: frozenset[int] = frozenset(),
    ):
        self.chat, self.model, self.tokenizer, self.lltok = chat, model, tokenizer, lltok
        self.hidden = hidden_ids  # token ids never shown in logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self._offsets: dict[int, int] = {}  # completions: text_offset of each choice's next token

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def finish(c: ChoiceResult) -> str | None:
        return "tool_calls" if c.tool_calls and c.finish_reason else c.finish_reason

    def full(self, choices: list[ChoiceResult], usage: Usage) -> dict[str, Any]:
        out = []
        for c in sorted(choices, key=lambda c: c.index):
            lp = None
            if c.logprobs is not None or c.prompt_logprobs is not None:
                lp = self.logprobs(c.index, c.logprobs or [], c.echo, c.prompt_logprobs)
            if self.chat:
                msg: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None}
                if c.tool_calls:
                    msg["content"] = c.text or None
                    msg["tool_calls"] = [t.openai() for t in c.tool_calls]
                choice = {"index": c.index, "message": msg, "logprobs": lp}
            else:
                choice = {"index": c.index, "text": c.echo + c.text, "logprobs": lp}
            choice["finish_reason"] = self.finish(c) or "stop"
            out.append(choice)
        return {**self._base(self.object), "choices": out, "usage": usage.model_dump()}

    def chunk(
        self,
        index: int,
        text: str | None = "",
        finish_reason: str | None = None,
        logprobs: list | None = None,
        role: bool = False,
        tool_calls: list[dict] | None = None,
        echo: str = "",
        prompt_logprobs: list | None = None,
    ) -> dict[str, Any]:
        lp = None
        if logprobs or prompt_logprobs:
            lp = self.logprobs(index, logprobs or [], echo, prompt_logprobs)
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text or role:
                delta["content"] = text or ""
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": lp,
                "finish_reason": finish_reason,
            }
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {
            "index": index,
            "text": echo + (text or ""),
            "logprobs": lp,
            "finish_reason": finish_reason,
        }
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage.model_dump()}

    # -- logprobs -----------------------------------------------------------------------------
    def token_bytes(self, tid: int) -> bytes:
        if self.lltok is not None:
            return self.lltok.decode_bytes([tid])
        return self.tokenizer.decode([tid], skip_special_tokens=False).encode()

    def token_text(self, tid: int) -> tuple[str, list[int]]:
        b = self.token_bytes(tid)
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: vLLM's spelling
            s = "bytes:" + "".join(f"\\x{x:02x}" for x in b)
        return s, list(b)

    def logprobs(
        self, index: int, items: list, echo: str = "", prompt: list | None = None
    ) -> dict[str, Any]:
        """Engine `Logprob`s -> OpenAI's chat or completions logprobs object; `prompt`
        (completions echo): (token id, Logprob or None) of each prompt token, listed first."""
        items = [x for x in items if x.token_id not in self.hidden]
        if self.chat:

            def entry(tid: int, lp: float) -> dict[str, Any]:
                s, b = self.token_text(tid)
                return {"token": s, "logprob": lp, "bytes": b}

            content = [
                {**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]}
                for x in items
            ]
            return {"content": content, "refusal": None}
        out: dict[str, list] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        at = 0
        for tid, x in prompt or ():
            if tid in self.hidden:
                continue
            out["tokens"].append(self.token_text(tid)[0])
            out["token_logprobs"].append(None if x is None else x.logprob)
            out["top_logprobs"].append(
                None if x is None else {self.token_text(t)[0]: v for t, v in x.top}
            )
            out["text_offset"].append(at)
            at += len(self.tokenizer.decode([tid]))
        offset = self._offsets.get(index, len(echo))
        for x in items:
            s = self.token_text(x.token_id)[0]
            out["tokens"].append(s)
            out["token_logprobs"].append(x.logprob)
            out["top_logprobs"].append({self.token_text(t)[0]: v for t, v in x.top})
            out["text_offset"].append(offset)
            offset += len(self.tokenizer.decode([x.token_id]))
        self._offsets[index] = offset
        return out
