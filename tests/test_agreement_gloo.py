"""Ranks that disagree on a gather get the same clear error on every rank: no abort, hang or garbage.

Two gloo ranks make one call each where they disagree (widths with the default hidden_widths,
dtype, dtype with equal bytes per row, T, leading dims, the hidden_widths lists themselves),
then one call where they agree, which must still work: the group survives the error.

Then ranks that fall out of step (docs/op.md, "Agreement across ranks"): a rank that skips a
call is caught at the first pair of calls whose shapes differ, by call number; a skip that
only pairs identical calls is not detectable and moves data; call numbers are kept per group
object, so a group created again under the same name counts from 0."""

import os

import pytest
import torch
import torch.distributed as dist

import tpfuse
from multiproc import run_ranks
from tpfuse.compile_ops import agreement

CASES = {
    # name: (rank 0's x, rank 1's x, hidden_widths or None for the default)
    "widths_default": (lambda: torch.ones(3, 5), lambda: torch.ones(3, 4), None),
    "dtype": (lambda: torch.ones(3, 4), lambda: torch.ones(3, 4, dtype=torch.bfloat16), None),
    "equal_bytes_per_row": (lambda: torch.ones(3, 4), lambda: torch.ones(3, 8, dtype=torch.bfloat16), None),
    "tokens": (lambda: torch.ones(3, 4), lambda: torch.ones(5, 4), None),
    "leading_dims": (lambda: torch.ones(2, 6, 4), lambda: torch.ones(3, 4, 4), None),
    "hidden_widths_lists": (lambda: torch.ones(3, 4), lambda: torch.ones(3, 6), ([4, 4], [4, 6])),
    # Rank 1's slab is wider than its own entry: its local check alone would raise on rank 1
    # while rank 0 waited in the collective; the agreement check runs first, on both.
    "slab_not_its_entry": (lambda: torch.ones(3, 4), lambda: torch.ones(3, 6), ([4, 4], [4, 4])),
    "scalar_on_one_rank": (lambda: torch.ones(()), lambda: torch.ones(3, 4), None),
}


def _ranks(rank, world_size):
    out = {}
    for name, (x0, x1, widths) in CASES.items():
        x = (x0 if rank == 0 else x1)()
        given = widths[rank] if isinstance(widths, tuple) else widths
        try:
            tpfuse.all_gather_hidden(x, dist.group.WORLD, given)
            out[name] = None
        except ValueError as err:
            out[name] = str(err)
    ok = tpfuse.all_gather_hidden(torch.full((2, 3), float(rank)), dist.group.WORLD)
    out["after"] = torch.equal(ok, torch.cat([torch.zeros(2, 3), torch.ones(2, 3)], -1))
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(2, _ranks)


@pytest.mark.parametrize("case", [c for c in CASES if c != "hidden_widths_lists"])
def test_disagreement_is_the_same_clear_error_on_every_rank(results, case):
    messages = [r[case] for r in results]
    assert messages[0] is not None and messages[0] == messages[1], messages
    # The cases are the first calls on the default group, in order: each names its own number.
    call = list(CASES).index(case)
    assert f"at call {call} of group '0' (numbered alike on every rank) the ranks disagree on the gather" \
        in messages[0], messages[0]
    assert "rank 0: dtype" in messages[0] and "rank 1: dtype" in messages[0]
    assert "a rank skipped or added this call or an earlier one" in messages[0]


def test_the_group_survives_a_refused_call(results):
    assert all(r["after"] for r in results)


def test_equal_bytes_with_other_meanings_is_refused_not_garbage(results):
    message = results[0]["equal_bytes_per_row"]
    assert "rank 0: dtype float32" in message and "rank 1: dtype bfloat16" in message


def test_the_signature_has_one_size_whatever_the_call():
    """The exchange itself must never mismatch: every call, even a scalar, gives WORDS words."""
    calls = [(torch.ones(3, 4), [4, 4], 0), (torch.ones(2, 6, 5, dtype=torch.bfloat16), [5, 3, 9], 7),
             (torch.ones(()), [-1, -1], 12345)]
    assert {len(agreement.signature(x, widths, n)) for x, widths, n in calls} == {agreement.WORDS}


def _gather(x, group):
    """One call; its error message, or None and the result."""
    try:
        return None, tpfuse.all_gather_hidden(x, group)
    except ValueError as err:
        return str(err), None


def _skip_then_other_shape(rank):
    """The code makes calls of 2, 3 and 5 tokens; rank 1 skips the second, so its 5-token call
    meets rank 0's 3-token one. Both ranks stop there, as a program stops at the error."""
    group = dist.new_group([0, 1])
    out = {"group": group.group_name}
    for call, tokens in enumerate((2, 3, 5)):
        if rank == 1 and call == 1:
            continue
        message, _ = _gather(torch.ones(tokens, 4), group)
        out[call] = message
        if message:
            break
    return out


def _skip_between_equal_shapes(rank):
    """Calls of 3, 3, 3 and 5 tokens, each slab filled with 10 * call + rank; rank 1 skips call 1.
    Rank 0's call 1 meets rank 1's call 2 (both 3 tokens): nothing can tell them apart, the data
    moves. Rank 0's call 2 meets rank 1's call 3 (5 tokens): refused on both, at call 2."""
    group = dist.new_group([0, 1])
    out = {"group": group.group_name}
    for call, tokens in enumerate((3, 3, 3, 5)):
        if rank == 1 and call == 1:
            continue
        message, y = _gather(torch.full((tokens, 4), float(10 * call + rank)), group)
        out[call] = message or [float(y[0, 0]), float(y[0, -1])]
        if message:
            break
    return out


def _counts_apart(rank):
    """Rank 1 counts one checked call that rank 0 never made (what TPFUSE_CHECK=1 on some ranks
    only would leave): equal shapes, and still refused on both, with both call numbers."""
    group = dist.new_group([0, 1])
    if rank == 1:
        agreement.next_call(group)
    message, _ = _gather(torch.ones(3, 4), group)
    return {"group": group.group_name, "message": message}


def _group_made_again(rank, world_size, store_file):
    """Two calls on the default group '0', the second refused; then the group is destroyed and made
    again (the same name '0'): its first call is call 0 again."""
    mismatched = torch.ones(3, 4 + rank)
    _gather(torch.ones(3, 4), None)
    before, _ = _gather(mismatched, None)
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
    after, _ = _gather(mismatched, None)
    return {"before": before, "after": after, "name": dist.group.WORLD.group_name}


def _out_of_step(rank, world_size, store_file):
    return {"skip_then_other_shape": _skip_then_other_shape(rank),
            "skip_between_equal_shapes": _skip_between_equal_shapes(rank),
            "counts_apart": _counts_apart(rank),
            "group_made_again": _group_made_again(rank, world_size, store_file)}


@pytest.fixture(scope="module")
def out_of_step(tmp_path_factory):
    store_file = os.path.join(tmp_path_factory.mktemp("store"), "rendezvous")
    return run_ranks(2, _out_of_step, store_file)


def test_a_skipped_call_is_refused_on_every_rank_at_the_first_shape_that_differs(out_of_step):
    r0, r1 = (r["skip_then_other_shape"] for r in out_of_step)
    assert r0[0] is None and r1[0] is None  # the first call, before the skip, works
    assert r0[1] is not None and r0[1] == r1[2]  # rank 1's third call meets rank 0's second: refused on both
    name = r0["group"]
    assert f"at call 1 of group {name!r} (numbered alike on every rank)" in r0[1], r0[1]
    assert "rank 0: dtype float32, leading dims [3]" in r0[1] and "rank 1: dtype float32, leading dims [5]" in r0[1]
    assert "a rank skipped or added this call or an earlier one" in r0[1]


def test_a_skip_that_pairs_identical_calls_moves_data_until_a_shape_differs(out_of_step):
    r0, r1 = (r["skip_between_equal_shapes"] for r in out_of_step)
    # Undetectable by any signature: rank 0's call 1 got rank 1's slab of call 2 (value 21, not 11).
    assert r0[0] == [0.0, 1.0] and r0[1] == [10.0, 21.0] and r1[2] == [10.0, 21.0]
    # Caught at the first pair whose shapes differ (rank 0's call 2, rank 1's call 3), on both ranks.
    assert r0[2] is not None and r0[2] == r1[3]
    assert f"at call 2 of group {r0['group']!r}" in r0[2] and "leading dims [5]" in r0[2], r0[2]


def test_ranks_whose_call_numbers_differ_are_refused_even_with_equal_shapes(out_of_step):
    messages = [r["counts_apart"]["message"] for r in out_of_step]
    name = out_of_step[0]["counts_apart"]["group"]
    assert messages[0] is not None and messages[0] == messages[1], messages
    assert messages[0].startswith(f"tpfuse: rank 1 is at call 1 of group {name!r}, rank 0 at call 0: "
                                  "a rank skipped or added a call"), messages[0]


def test_call_numbers_are_kept_per_group_object_not_per_name(out_of_step):
    for r in out_of_step:
        made_again = r["group_made_again"]
        assert made_again["name"] == "0"
        # Negative control: the count runs on the first group object ...
        assert "at call 1 of group '0'" in made_again["before"], made_again["before"]
        # ... and restarts on the new one, though it has the same name.
        assert "at call 0 of group '0'" in made_again["after"], made_again["after"]
