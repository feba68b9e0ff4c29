"""The plan of the UNet calls, read without a model: rows, source branches, CFG halves, padding."""

from __future__ import annotations

from ddim_worker.core.call_plan import RowNeeds, plan_inversions, plan_sampling


def test_plain_rows_fill_calls_in_order_guided_and_unguided_apart():
    needs = [RowNeeds(guided=g) for g in (True, False, True, True, True, True, False)]
    plan = plan_sampling(needs, batch_size=4)
    assert [[b.row for b in call.branches] for call in plan] == [[0, 2, 3, 4], [5], [1, 6]]
    assert [call.guided for call in plan] == [True, True, False]
    assert [call.unet_rows for call in plan] == [8, 8, 4]  # padded to 4 per half, doubled where guided
    assert plan[1].layout() == ["uncond:edit 5", "uncond:pad", "uncond:pad", "uncond:pad",
                                "text:edit 5", "text:pad", "text:pad", "text:pad"]
    assert not any(b.is_source or b.source is not None for call in plan for b in call.branches)


def test_without_a_batch_size_each_kind_is_one_unpadded_call():
    plan = plan_sampling([RowNeeds(True), RowNeeds(False), RowNeeds(True, "img")], batch_size=None)
    assert [call.layout() for call in plan] == [
        ["uncond:edit 0", "uncond:source 2", "uncond:edit 2", "text:edit 0", "text:source 2", "text:edit 2"],
        ["text:edit 1"]]


def test_an_image_with_several_edits_has_one_source_branch_in_their_call():
    """Rows 0, 2, 3 edit image A (one source branch), row 1 image B: both units fit one call of 6."""
    needs = [RowNeeds(True, "A"), RowNeeds(True, "B"), RowNeeds(True, "A"), RowNeeds(True, "A")]
    [call] = plan_sampling(needs, batch_size=6)
    assert call.layout()[6:] == ["text:source 0", "text:edit 0", "text:edit 2", "text:edit 3", "text:source 1",
                                 "text:edit 1"]
    assert [b.source for b in call.branches] == [None, 0, 0, 0, None, 4]  # each edit reads its own image's source
    assert call.edits == [1, 2, 3, 5]


def test_units_are_packed_first_fit_and_split_only_when_larger_than_a_call():
    # A: 5 edits (6 branches) in calls of 4: two pieces, each with its own source (1 + 3, 1 + 2); B: 1 edit (2).
    needs = [RowNeeds(True, "A")] * 5 + [RowNeeds(True, "B"), RowNeeds(True)]
    plan = plan_sampling(needs, batch_size=4)
    rows = [[(b.row, b.is_source, b.source) for b in call.branches] for call in plan]
    assert rows == [
        [(0, True, None), (0, False, 0), (1, False, 0), (2, False, 0)],
        [(3, True, None), (3, False, 0), (4, False, 0), (6, False, None)],  # the plain row fills the gap
        [(5, True, None), (5, False, 0)],
    ]
    edits = sorted(b.row for call in plan for b in call.branches if not b.is_source)
    assert edits == list(range(7))  # every row edited exactly once


def test_a_source_and_its_edit_need_two_rows_even_at_batch_size_one():
    plan = plan_sampling([RowNeeds(False, "A"), RowNeeds(False), RowNeeds(False, "A")], batch_size=1)
    assert [(call.size, [(b.row, b.is_source, b.source) for b in call.branches]) for call in plan] == [
        (2, [(0, True, None), (0, False, 0)]), (2, [(2, True, None), (2, False, 0)]), (1, [(1, False, None)])]


def test_inversions_are_grouped_by_kind_then_chunked():
    calls = plan_inversions(leaders=[0, 3, 4, 6, 7], from_levels=[10, 10, 6, 10, 10],
                            methods=["ddim", "ddim", "ddim", "ddim", "fixed-point:1"],
                            guided=[False, False, False, False, False], batch_size=2)
    assert [(c.rows, c.from_level, c.method) for c in calls] == [
        ((0, 3), 10, "ddim"), ((6,), 10, "ddim"), ((4,), 6, "ddim"), ((7,), 10, "fixed-point:1")]
