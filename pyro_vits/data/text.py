"""Text the way VITS reads it: its symbol table, ``cleaned_text_to_sequence`` and ``intersperse``."""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Mapping, Sequence

_PAD = "_"


_PUNCTUATION = ';:,.!?¡¿—…"«»“” '


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


_LETTERS_IPA = (
    "\u0251\u0250\u0252\xe6\u0253\u0299\u03b2\u0254\u0255\xe7\u0257\u0256\xf0\u02a4\u0259\u0258\u025a\u025b"
    "\u025c\u025d\u025e\u025f\u0284\u0261\u0260\u0262\u029b\u0266\u0267\u0127\u0265\u029c\u0268\u026a\u029d"
    "\u026d\u026c\u026b\u026e\u029f\u0271\u026f\u0270\u014b\u0273\u0272\u0274\xf8\u0275\u0278\u03b8\u0153"
    "\u0276\u0298\u0279\u027a\u027e\u027b\u0280\u0281\u027d\u0282\u0283\u0288\u02a7\u0289\u028a\u028b\u2c71"
    "\u028c\u0263\u0264\u028d\u03c7\u028e\u028f\u0291\u0290\u0292\u0294\u02a1\u0295\u02a2\u01c0\u01c1\u01c2"
    "\u01c3\u02c8\u02cc\u02d0\u02d1\u02bc\u02b4\u02b0\u02b1\u02b2\u02b7\u02e0\u02e4\u02de\u2193\u2191\u2192"
    "\u2197\u2198'\u0329'\u1d7b"
)


VITS_SYMBOLS: tuple[str, ...] = (_PAD, *_PUNCTUATION, *_LETTERS, *_LETTERS_IPA)
"""VITS's ``text.symbols.symbols`` (178 entries): pad ``_`` (id 0), punctuation and space, ASCII letters, IPA.
The apostrophe occurs twice; as in VITS, its id is the later position."""


@functools.lru_cache(maxsize=8)
def _symbol_ids(symbols: tuple[str, ...]) -> dict[str, int]:
    return {symbol: i for i, symbol in enumerate(symbols)}


def cleaned_text_to_sequence(cleaned_text: str, symbols: Sequence[str] = VITS_SYMBOLS) -> list[int]:
    """Token ids of already-cleaned text, one per character (VITS's ``text.cleaned_text_to_sequence``).

    Raises ``ValueError`` naming the first character not in ``symbols`` and its position."""
    if not isinstance(cleaned_text, str):
        raise TypeError(f"cleaned_text must be a str, got {type(cleaned_text).__name__}")
    table = _symbol_ids(tuple(symbols))
    try:
        return [table[ch] for ch in cleaned_text]
    except KeyError:
        pos = next(i for i, ch in enumerate(cleaned_text) if ch not in table)
        ch = cleaned_text[pos]
        raise ValueError(
            f"unknown symbol {ch!r} (U+{ord(ch):04X}) at character {pos} of the text; the symbol "
            f"table has {len(table)} symbols"
        ) from None


def intersperse(sequence: Sequence[int], item: int = 0) -> list[int]:
    """``[item, s0, item, s1, ..., item]`` (VITS's ``commons.intersperse``, used when ``add_blank``)."""
    result = [item] * (2 * len(sequence) + 1)
    result[1::2] = list(sequence)
    return result


def piper_phoneme_ids(ipa: str, id_map: Mapping[str, Sequence[int]]) -> tuple[list[int], int]:
    """Piper's ``phonemes_to_ids`` of ``ipa``: ``(ids, number of skipped phonemes)``."""
    for key in ("^", "_", "$"):
        if key not in id_map:
            raise ValueError(f"phoneme_id_map lacks {key!r} (not a Piper symbol table)")
    ids, skipped = [*id_map["^"], *id_map["_"]], 0
    for phoneme in unicodedata.normalize("NFD", ipa):
        if phoneme not in id_map:
            skipped += 1
            continue
        ids += [*id_map[phoneme], *id_map["_"]]
    return ids + list(id_map["$"]), skipped
