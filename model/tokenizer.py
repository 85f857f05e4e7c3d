"""Tokenizer of a checkpoint directory: tokenizer.json (HF `tokenizers`) plus the chat template
from tokenizer_config.json or chat_template.jinja, rendered with jinja2 as transformers does."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    def __init__(
        self,
        tok: HFTokenizer,
        chat_template: str | None,
        eos_token_ids: tuple[int, ...],
        bos_token: str | None = None,
        eos_token: str | None = None,
    ):
        self.tok = tok
        self.chat_template = chat_template
        self.eos_token_ids = eos_token_ids
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = None
        if chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(chat_template)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        eos = cfg.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        bos = cfg.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        model_cfg = (
            json.loads((path / "config.json").read_text())
            if (path / "config.json").is_file()
            else {}
        )
        eos_ids = model_cfg.get("eos_token_id")
        eos_ids = (
            tuple(eos_ids)
            if isinstance(eos_ids, list)
            else ((eos_ids,) if eos_ids is not None else ())
        )
        if not eos_ids and eos is not None and tok.token_to_id(eos) is not None:
            eos_ids = (tok.token_to_id(eos),)
        return cls(tok, template, eos_ids, bos, eos)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, seqs: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """Many decodes in one call into the Rust tokenizer (the engine decodes once per step)."""
        return self.tok.decode_batch(seqs, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **variables
    ) -> str:
        """`variables` reach the template as transformers passes them (e.g. `tools`)."""
        if self._template is None:
            raise ValueError("this model has no chat template; use /v1/completions with a prompt")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **variables,
        )

    @property
    def special_tokens(self) -> dict[str, int]:
        """Added special tokens: text -> id."""
        return {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}


def _raise(msg: str):
    raise jinja2.exceptions.TemplateError(msg)
