"""Tokenizers of served models, and incremental detokenization.

Each model's tokenizer comes from its checkpoint directory through transformers' AutoTokenizer
(tokenizer.json + tokenizer_config.json, chat template included), offline.
"""

from __future__ import annotations

from pathlib import Path

from sglang_crosspool.models.config import CheckpointError


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({e})") from None


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    Decodes a short window of recent tokens and emits only text that is complete: a byte-level
    BPE may split one character across tokens, which decodes to U+FFFD until it is whole.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into text

    def add(self, token_ids: list[int]) -> str:
        """Appends tokens; returns the new text (may be empty while a character is partial)."""
        self.ids.extend(token_ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=self.skip)
        after = decode(self.ids[self._prefix :], skip_special_tokens=self.skip)
        if after.endswith("\ufffd") or len(after) < len(before):
            return ""
        delta = after[len(before) :]
        self.text += delta
        self._prefix, self._read = self._read, len(self.ids)
        return delta
