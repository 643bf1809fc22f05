"""The text and bytes of single tokens, for OpenAI's logprobs (`token`, `bytes`).

A token need not be whole UTF-8 (byte-level BPE splits characters), so its bytes are the
raw bytes it stands for and its text is those bytes decoded with replacement characters.
The table covers the whole vocabulary and is built once, off the event loop, when the
engine is attached (from `Engine.token_strings`); a lookup is then a
list index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...scheduler.engine import Engine

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


@dataclass(frozen=True)
class TokenPieces:
    raw: list[bytes]  # [vocab]: the bytes each token id stands for

    @classmethod
    def of_engine(cls, engine: Engine) -> TokenPieces:
        """The table of `engine`'s vocabulary (blocking: run it off the event loop)."""
        return cls.of_tokens(engine.token_strings())

    @classmethod
    def of_tokens(cls, tokens: list[str]) -> TokenPieces:
        """The table of a vocabulary given as its token strings (id order): byte-level BPE
        (GPT-2's alphabet) when every token is spelled in it, else SentencePiece-style."""
        alphabet = _byte_level_alphabet()
        if all(set(t) <= alphabet.keys() for t in tokens):
            return cls([bytes(alphabet[c] for c in t) for t in tokens])
        return cls([_piece_bytes(t) for t in tokens])

    def bytes_of(self, token_id: int) -> bytes:
        """The bytes of `token_id` (none for an id past the vocabulary)."""
        return self.raw[token_id] if 0 <= token_id < len(self.raw) else b""

    def text(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")


def _piece_bytes(token: str) -> bytes:
    """The bytes of a SentencePiece token: `<0xNN>` is a byte, `▁` a space."""
    if found := _BYTE_TOKEN.fullmatch(token):
        return bytes([int(found.group(1), 16)])
    return token.replace("▁", " ").encode()


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}
