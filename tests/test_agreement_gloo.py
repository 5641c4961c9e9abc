"""Ranks that disagree on a gather get the same clear error on every rank: no abort, hang or garbage.

Two gloo ranks make one call each where they disagree (widths with the default hidden_widths,
dtype, dtype with equal bytes per row, T, leading dims, the hidden_widths lists themselves),
then one call where they agree, which must still work: the group survives the error."""

import pytest
import torch
import torch.distributed as dist

import tpfuse
from multiproc import run_ranks

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
    assert "the ranks of group" in messages[0] and "disagree on the gather" in messages[0]
    assert "rank 0: dtype" in messages[0] and "rank 1: dtype" in messages[0]


def test_the_group_survives_a_refused_call(results):
    assert all(r["after"] for r in results)


def test_equal_bytes_with_other_meanings_is_refused_not_garbage(results):
    message = results[0]["equal_bytes_per_row"]
    assert "rank 0: dtype float32" in message and "rank 1: dtype bfloat16" in message
