"""Which source token each edit token takes its cross-attention map from (Prompt-to-Prompt, Hertz et al. 2022).

Pure functions over token ids. Two kinds, chosen per row:

- **word swap**: the prompts tokenise to the same length ("a red circle" -> "a green circle"): token j reads the
  source's token j, the swapped words included (their maps say *where*, the edit's values say *what*);
- **refinement**: the lengths differ ("a circle" -> "a red circle"): tokens are aligned by a global alignment
  (Needleman-Wunsch with free gaps, i.e. a longest common subsequence); an aligned token reads its source token, a new
  token keeps its own map.

Positions past the edit prompt (CLIP's padding) read the same position of the source. *Edit words* are the tokens
of the edit prompt that differ from what they read: the swapped tokens, or the new ones; reweighting scales them.
CLIP is causal, so every token after a changed word has another embedding anyway: only the maps are shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

WORD_SWAP, REFINE = "word-swap", "refine"


@dataclass(frozen=True)
class TokenMap:
    """For each of the ``length`` edit-token positions: which source position it reads, and whether it does."""

    kind: str  # WORD_SWAP or REFINE
    mapper: tuple[int, ...]  # edit position j reads the source's position mapper[j]
    aligned: tuple[bool, ...]  # False: a new token, it keeps its own map
    changed: tuple[bool, ...]  # the edit words (swapped or new tokens)


def global_alignment(source: Sequence[int], edit: Sequence[int]) -> list[int]:
    """For each edit token, the index of the source token it is aligned to, or -1.

    Needleman-Wunsch with match 1, mismatch -1, gap 0 (Prompt-to-Prompt's scores): free gaps make a mismatch never
    worth aligning, so this is a longest common subsequence. Ties prefer leaving the edit token unaligned first, as
    the reference traceback does.
    """
    n, m = len(source), len(edit)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diagonal = score[i - 1][j - 1] + (1 if source[i - 1] == edit[j - 1] else -1)
            score[i][j] = max(score[i][j - 1], score[i - 1][j], diagonal)
    mapper = [-1] * m
    i, j = n, m
    while i > 0 and j > 0:
        if score[i][j] == score[i][j - 1]:  # edit token j - 1 left unaligned
            j -= 1
        elif score[i][j] == score[i - 1][j]:  # source token i - 1 left unaligned
            i -= 1
        else:  # aligned (a match: a mismatch never wins with free gaps)
            mapper[j - 1] = i - 1
            i, j = i - 1, j - 1
    return mapper


def align_tokens(source_ids: Sequence[int], edit_ids: Sequence[int], length: int) -> TokenMap:
    """The token map of one row over ``length`` positions (the text encoder's, 77 for CLIP).

    ``source_ids``/``edit_ids``: the prompts' token ids as the tokenizer gives them (start and end tokens included,
    truncated to ``length``, no padding).
    """
    source_ids, edit_ids = list(source_ids)[:length], list(edit_ids)[:length]
    if len(source_ids) == len(edit_ids):
        changed = [a != b for a, b in zip(source_ids, edit_ids)]
        changed += [False] * (length - len(changed))
        return TokenMap(WORD_SWAP, tuple(range(length)), (True,) * length, tuple(changed))
    aligned_to = global_alignment(source_ids, edit_ids)
    mapper = [k if k >= 0 else j for j, k in enumerate(aligned_to)] + list(range(len(edit_ids), length))
    aligned = [k >= 0 for k in aligned_to] + [True] * (length - len(edit_ids))
    changed = [k < 0 for k in aligned_to] + [False] * (length - len(edit_ids))
    return TokenMap(REFINE, tuple(mapper), tuple(aligned), tuple(changed))
