"""The refit corpus's symbol ids: Piper's phonemes_to_ids for a Piper voice, VITS's symbols otherwise."""

from __future__ import annotations

import pytest

from pyro_vits.data.refit_corpus import TextIds
from pyro_vits.data.text import VITS_SYMBOLS, piper_phoneme_ids

ID_MAP = {"_": [0], "^": [1], "$": [2], " ": [3], "a": [4], "b": [5], "ˈ": [6], "\u0303": [7]}


def test_piper_ids_bos_pad_after_each_phoneme_eos_and_skips_unknown():
    assert piper_phoneme_ids("ab", ID_MAP) == ([1, 0, 4, 0, 5, 0, 2], 0)
    assert piper_phoneme_ids("aˈx b", ID_MAP) == ([1, 0, 4, 0, 6, 0, 3, 0, 5, 0, 2], 1)
    assert piper_phoneme_ids("ã", ID_MAP)[0] == [1, 0, 4, 0, 7, 0, 2]  # NFD: a + combining tilde
    with pytest.raises(ValueError, match="lacks"):
        piper_phoneme_ids("a", {"a": [1]})


def test_vits_symbols_with_and_without_blanks():
    a, b = VITS_SYMBOLS.index("a"), VITS_SYMBOLS.index("b")
    assert TextIds()("ab") == ([0, a, 0, b, 0], 0)
    assert TextIds(add_blank=False)("ab") == ([a, b], 0)
    assert TextIds(ID_MAP)("ab")[0] == [1, 0, 4, 0, 5, 0, 2]
