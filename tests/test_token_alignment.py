"""Prompt-to-Prompt's token maps, worked out by hand: word swap and refinement."""

from __future__ import annotations

from ddim_worker.shapes.arch import make_tokenizer
from ddim_worker.core.token_alignment import REFINE, WORD_SWAP, align_tokens, global_alignment

# Token ids as the shapes tokenizer gives them would be opaque; letters stand for tokens here.
BOS, EOS = 0, 9
A, RED, GREEN, CIRCLE, ON, WHITE, BACKGROUND, BIG = 1, 2, 3, 4, 5, 6, 7, 8


def test_an_inserted_word_is_new_and_the_rest_aligns_around_it():
    # "a circle on a white background" -> "a red circle on a white background"
    source = [BOS, A, CIRCLE, ON, A, WHITE, BACKGROUND, EOS]
    edit = [BOS, A, RED, CIRCLE, ON, A, WHITE, BACKGROUND, EOS]
    assert global_alignment(source, edit) == [0, 1, -1, 2, 3, 4, 5, 6, 7]
    m = align_tokens(source, edit, length=12)
    assert m.kind == REFINE
    assert m.mapper == (0, 1, 2, 2, 3, 4, 5, 6, 7, 9, 10, 11)  # new token: its own position (unused); padding: same
    assert m.aligned == (True, True, False) + (True,) * 9
    assert m.changed == (False, False, True) + (False,) * 9


def test_a_removed_word_leaves_a_gap_in_the_source():
    # "a big red circle" -> "a red circle": the edit's tokens read past "big"
    assert global_alignment([BOS, A, BIG, RED, CIRCLE, EOS], [BOS, A, RED, CIRCLE, EOS]) == [0, 1, 3, 4, 5]
    m = align_tokens([BOS, A, BIG, RED, CIRCLE, EOS], [BOS, A, RED, CIRCLE, EOS], length=8)
    assert m.mapper == (0, 1, 3, 4, 5, 5, 6, 7) and all(m.aligned) and not any(m.changed)


def test_a_replaced_word_of_another_length_is_never_aligned_to_what_it_replaced():
    # "a red circle" -> "a big green circle": mismatches are not aligned (gaps are free)
    assert global_alignment([BOS, A, RED, CIRCLE, EOS], [BOS, A, BIG, GREEN, CIRCLE, EOS]) == [0, 1, -1, -1, 3, 4]


def test_prompts_of_the_same_length_are_a_word_swap():
    m = align_tokens([BOS, A, RED, CIRCLE, EOS], [BOS, A, GREEN, CIRCLE, EOS], length=7)
    assert m.kind == WORD_SWAP
    assert m.mapper == tuple(range(7)) and all(m.aligned)
    assert m.changed == (False, False, True, False, False, False, False)


def test_the_shapes_tokenizer_makes_most_colour_edits_a_word_swap_and_an_extra_word_a_refinement():
    tokenizer = make_tokenizer()

    def ids(text: str) -> list[int]:
        return tokenizer(text).input_ids

    swap = align_tokens(ids("a red circle on a white background"), ids("a blue circle on a white background"), 77)
    assert swap.kind == WORD_SWAP and [j for j, c in enumerate(swap.changed) if c] == [2]
    # "green" is four tokens in this tokenizer (g re e n): red -> green is a refinement with four new tokens
    green = align_tokens(ids("a red circle on a white background"), ids("a green circle on a white background"), 77)
    assert green.kind == REFINE and [j for j, c in enumerate(green.changed) if c] == [2, 3, 4, 5]
    assert green.mapper[6:12] == (3, 4, 5, 6, 7, 8)
    refine = align_tokens(ids("a circle on a white background"), ids("a red circle on a white background"), 77)
    assert refine.kind == REFINE and [j for j, c in enumerate(refine.changed) if c] == [2]
    assert refine.mapper[3:9] == (2, 3, 4, 5, 6, 7)
