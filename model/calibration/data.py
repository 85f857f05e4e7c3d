"""Calibration data: JSONL (`{"text": ...}` or chat `{"messages": [...]}`) or plain text files,
tokenised with the model's tokenizer and packed into a fixed [num_seqs, seq_len] id tensor.

Documents are concatenated with the end-of-sequence token between them and cut into equal rows:
IndexCache only matters past `index_topk` tokens, so rows are filled to full length rather than
padded per document. The same rows are scored for every candidate plan (paper section 3.2).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.tokenizer import Tokenizer


@dataclass(frozen=True)
class CalibrationData:
    ids: torch.Tensor  # [num_seqs, seq_len] int64
    sha256: str  # of the exact token ids scored (shape included): what the plan was fitted on
    files: list[dict] = field(default_factory=list)  # [{"name", "sha256", "documents"}]
    documents: int = 0

    @property
    def num_seqs(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        """Fixed mini-batches [b, seq_len], in order (the last may be smaller)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return list(self.ids.split(batch_size))

    def provenance(self) -> dict:
        return {
            "calibration_data_hash": self.sha256,
            "data_files": self.files,
            "documents": self.documents,
            "seq_len": self.seq_len,
            "num_seqs": self.num_seqs,
        }


def read_documents(path: str | Path, tokenizer: Tokenizer | None = None) -> list[str]:
    """Texts of one file: a .jsonl/.json-lines file gives one document per line, anything else is
    one plain-text document. Chat records are rendered with the tokenizer's chat template."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data: {path} does not exist or is not a file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        if not raw.strip():
            raise ValueError(f"data: {path} is empty")
        return [raw]
    docs = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"data: {path}:{n} is not valid JSON ({e.msg})") from None
        docs.append(_record_text(rec, f"{path}:{n}", tokenizer))
    if not docs:
        raise ValueError(f"data: {path} has no JSONL records")
    return docs


def _record_text(rec, where: str, tokenizer: Tokenizer | None) -> str:
    if not isinstance(rec, dict):
        raise ValueError(f"data: {where} must be a JSON object with 'text' or 'messages'")
    if "text" in rec:
        if not isinstance(rec["text"], str):
            raise ValueError(f"data: {where} field 'text' must be a string")
        return rec["text"]
    if "messages" in rec:
        msgs = rec["messages"]
        if (
            not isinstance(msgs, list)
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in msgs
            )
            or not msgs
        ):
            raise ValueError(
                f"data: {where} field 'messages' must be a non-empty list of "
                "{'role': str, 'content': str}"
            )
        if tokenizer is None or tokenizer.chat_template is None:
            raise ValueError(
                f"data: {where} has chat 'messages' but the model's tokenizer has no "
                "chat template; use {'text': ...} records"
            )
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=False)
    raise ValueError(f"data: {where} has neither 'text' nor 'messages' (keys: {sorted(rec)[:5]})")


def load_calibration(
    paths: list[str | Path] | str | Path,
    tokenizer: Tokenizer,
    seq_len: int,
    num_seqs: int,
    min_seq_len: int = 2,
) -> CalibrationData:
    """Tokenise `paths` and pack the first num_seqs * seq_len tokens into rows.

    `min_seq_len`: the caller's floor (calibration needs more than `index_topk` tokens per row,
    otherwise every key is selected and all plans score the same)."""
    if isinstance(paths, str | Path):
        paths = [paths]
    if not paths:
        raise ValueError("data: no data file given")
    if not isinstance(seq_len, int) or seq_len < min_seq_len:
        raise ValueError(f"seq_len must be an integer >= {min_seq_len}, got {seq_len!r}")
    if not isinstance(num_seqs, int) or num_seqs < 1:
        raise ValueError(f"num_seqs must be an integer >= 1, got {num_seqs!r}")
    need = seq_len * num_seqs
    sep = list(tokenizer.eos_token_ids[:1])
    stream: list[int] = []
    files, n_docs = [], 0
    for p in paths:
        docs = read_documents(p, tokenizer)
        files.append(
            {
                "name": Path(p).name,
                "documents": len(docs),
                "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest(),
            }
        )
        for d in docs:
            if len(stream) >= need:
                break
            stream += tokenizer.encode(d) + sep
            n_docs += 1
    if len(stream) < need:
        raise ValueError(
            f"data: {len(stream)} tokens in {', '.join(str(p) for p in paths)}, "
            f"need num_seqs * seq_len = {num_seqs} * {seq_len} = {need}; lower "
            "num_seqs or seq_len, or add data"
        )
    ids = torch.tensor(stream[:need], dtype=torch.int64).view(num_seqs, seq_len)
    h = hashlib.sha256(f"{num_seqs}x{seq_len}:".encode())
    h.update(ids.to(torch.int32).numpy().tobytes())
    return CalibrationData(ids=ids, sha256=h.hexdigest(), files=files, documents=n_docs)
