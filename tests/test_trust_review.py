"""A call that one rank refuses is refused by every rank; nothing rank-local steers a collective.

Real gloo ranks (docs/contract.md §2, §4; docs/op.md, "Errors" and "Agreement across ranks"):
each case below is a call that some rank would refuse on its own view (a weight of another
shape or dtype, a slot out of range, a different ``TPFUSE_BACKEND``, a gradient wanted on one
rank only). Every rank must raise a clear error before any payload moves; a rank must never
wait in a collective its peer left. Each case runs on its own group with a short timeout, so a
rank left waiting shows as a gloo timeout here instead of a hang, and a barrier on the default
group brings the ranks back together before the next case. After the cases, one agreed call on
a fresh group must still work.

Then what the review found clean, kept as tests: subgroups of some ranks, the group given as
None, by name or as an object, strided and offset inputs, T = 0. The group's set-up (its facts'
exchange, run here on gloo) agrees on the settings: where they differ, or one does not parse on
one rank, every rank raises (docs/safety.md, "Rank consistency of the choice").

The nccl_symmetric launcher is checked on the CPU with a stand-in workspace: a kept launcher
must move a call through the group's current windows, never the ones it saw when it was made
(keeping launchers is rank-local, the windows are not). Last, the switches (TPFUSE_CHECK and
the like) refuse a value they do not know instead of guessing.
"""

import datetime
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks

import tpfuse
from tpfuse.compile_ops.linear_all_gather_hidden import linear_all_gather_hidden

#: a rank left waiting by its peer gives up after this long (seconds): a hang, seen as an error
GIVE_UP_S = 3


def _outcome(fn):
    """(error type, message, seconds) of ``fn()``, or ("ok", None, seconds)."""
    start = time.monotonic()
    try:
        fn()
        kind, message = "ok", None
    except Exception as err:  # noqa: BLE001 - the test compares what every rank raised
        kind, message = type(err).__name__, str(err)
    return kind, message, round(time.monotonic() - start, 1)


def _gather(x):
    """The call on a group ``g``, with the default widths."""
    return lambda g: tpfuse.all_gather_hidden(x, g)


def _env(name, value):
    """Set (value) or unset (None) ``name`` for one case on this rank."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _case_calls(rank):
    """name -> (the call on this rank, the settings this rank has for it)."""
    x = torch.ones(2, 4)
    weight = torch.ones(3, 4)
    grad_x = torch.ones(2, 4, requires_grad=rank == 0)
    grad_w = torch.ones(3, 4, requires_grad=rank == 0)
    op = torch.ops.tpfuse.all_gather_hidden.default
    return {
        # The fused linear op's own checks ran before any agreement: the refusing rank raised alone.
        "linear_weight_k": (lambda g: linear_all_gather_hidden(x, torch.ones(3, 4 if rank == 0 else 5), None, g), {}),
        "linear_weight_dtype": (lambda g: linear_all_gather_hidden(
            x, weight if rank == 0 else weight.double(), None, g), {}),
        "linear_bias_shape": (lambda g: linear_all_gather_hidden(
            x, weight, torch.ones(3 if rank == 0 else 2), g), {}),
        "linear_weight_k_with_grad": (lambda g: linear_all_gather_hidden(
            x, torch.ones(3, 4 if rank == 0 else 5, requires_grad=True), None, g), {}),
        # A slot out of range on one rank only (the argument is the pass's; it must agree too).
        "slot_on_one_rank": (lambda g: op(x, [4, 4], g.group_name, 7 if rank == 1 else -1), {}),
        # Settings that steer dispatch, different on one rank.
        "backend_nccl_on_one_rank": (_gather(x), {"TPFUSE_BACKEND": "nccl" if rank == 1 else None}),
        "backend_bad_on_one_rank": (_gather(x), {"TPFUSE_BACKEND": "no-such-backend" if rank == 1 else None}),
        "block_v_on_one_rank": (_gather(x), {"TPFUSE_PUSH_BLOCK_V": "128" if rank == 1 else None}),
        "block_v_bad_on_one_rank": (_gather(x), {"TPFUSE_PUSH_BLOCK_V": "many" if rank == 1 else None}),
        # A gradient wanted on rank 0 only: its backward would wait in a reduce-scatter rank 1 never makes.
        "grad_on_one_rank": (_gather(grad_x), {}),
        "linear_grad_on_one_rank": (lambda g: linear_all_gather_hidden(x, grad_w, None, g), {}),
        # The same bad value on every rank: one clear error, alike (a control: this always worked).
        "backend_bad_everywhere": (_gather(x), {"TPFUSE_BACKEND": "no-such-backend"}),
        # One list, too short for the group, on every rank: the error says what is accepted.
        "widths_too_few": (lambda g: op(x, [4], g.group_name), {}),
    }


def _refusals(rank, world_size):
    calls = _case_calls(rank)
    # Every group first (creating one is collective), each with a short timeout.
    groups = {name: dist.new_group([0, 1], timeout=datetime.timedelta(seconds=GIVE_UP_S)) for name in calls}
    out = {}
    for name, (call, env) in calls.items():
        group = groups[name]
        saved = {k: os.environ.get(k) for k in env}
        for k, v in env.items():
            _env(k, v)
        try:
            out[name] = _outcome(lambda: call(group))
        finally:
            for k, v in saved.items():
                _env(k, v)
        dist.barrier()  # a rank left waiting gives up within GIVE_UP_S; both go on together
    fresh = dist.new_group([0, 1])
    y = tpfuse.all_gather_hidden(torch.full((2, 3), float(rank)), fresh)
    out["after"] = torch.equal(y, torch.cat([torch.zeros(2, 3), torch.ones(2, 3)], -1))
    return out


@pytest.fixture(scope="module")
def refusals():
    return run_ranks(2, _refusals, timeout=240)


#: case -> (error type on every rank, what every rank's message must say)
REFUSED = {
    "linear_weight_k": ("ValueError", "weight.shape=[3, 5] on rank 1; expected [hidden_widths[1]=3, x.shape[-1]=4]"),
    "linear_weight_dtype": ("TypeError", "x, weight and bias must share one dtype"),
    "linear_bias_shape": ("ValueError", "bias.shape=[2] on rank 1; expected [3] or None"),
    "linear_weight_k_with_grad": ("ValueError", "weight.shape=[3, 5] on rank 1"),
    "slot_on_one_rank": ("ValueError", "slot=7 is not one of (-1, 0, 1)"),
    "backend_nccl_on_one_rank": ("ValueError", "TPFUSE_BACKEND"),
    "backend_bad_on_one_rank": ("ValueError", "TPFUSE_BACKEND"),
    "block_v_on_one_rank": ("ValueError", "TPFUSE_PUSH_BLOCK_V"),
    "block_v_bad_on_one_rank": ("ValueError", "TPFUSE_PUSH_BLOCK_V='many' invalid literal"),
    "grad_on_one_rank": ("ValueError", "gradient"),
    "linear_grad_on_one_rank": ("ValueError", "gradient"),
    "backend_bad_everywhere": ("ValueError", "TPFUSE_BACKEND='no-such-backend' is not one of"),
    "widths_too_few": ("ValueError", "len(hidden_widths)=1 but group"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_call_one_rank_refuses_is_refused_by_every_rank(refusals, case):
    kind, says = REFUSED[case]
    got = [r[case] for r in refusals]
    for rank, (got_kind, message, seconds) in enumerate(got):
        # Negative control built in: before the fix the peer of the refusing rank timed out here
        # (a gloo error after GIVE_UP_S), or every rank raised an IndexError.
        assert got_kind == kind and says in message, (case, rank, got)
        assert seconds < GIVE_UP_S, (case, rank, got)


def test_the_refusing_rank_is_named_to_its_peers(refusals):
    for case in ("linear_weight_k", "slot_on_one_rank", "linear_bias_shape"):
        message = refusals[0][case][1]  # rank 0 had nothing wrong itself
        assert "rank 1" in message and "every rank" in message, (case, message)


def test_settings_that_differ_are_named_with_every_rank_s_value(refusals):
    message = refusals[0]["backend_nccl_on_one_rank"][1]
    assert "TPFUSE_BACKEND='nccl'" in message and "rank 0" in message and "rank 1" in message, message


def test_the_group_works_after_the_refusals(refusals):
    assert all(r["after"] for r in refusals)


# --------------------------------------------------------------------------- areas found clean


def _clean(rank, world_size):
    out = {}
    # A group of some ranks only: ranks 0 and 2; rank 1 is not in it and makes no call.
    pair = dist.new_group([0, 2])
    if rank != 1:
        mine = torch.full((2, 3), float(rank))
        got = [tpfuse.all_gather_hidden(mine, pair), tpfuse.all_gather_hidden(mine, pair.group_name)]
        out["subgroup"] = all(torch.equal(g, torch.cat([torch.zeros(2, 3), torch.full((2, 3), 2.0)], -1))
                              for g in got)
    # The default group as None, by name and as an object: one group.
    x = torch.arange(6.0).view(2, 3) + 10 * rank
    expected = torch.cat([torch.arange(6.0).view(2, 3) + 10 * r for r in range(world_size)], -1)
    out["default_group"] = all(torch.equal(tpfuse.all_gather_hidden(x, g), expected)
                               for g in (None, dist.group.WORLD, dist.group.WORLD.group_name))
    # Strided, offset and broadcast inputs, each rank's in its own layout: the same bytes.
    def window(r):
        return (torch.arange(40.0).view(4, 10) + 100 * r)[1:3, 2:5]

    layouts = {0: window(0),  # a storage offset and a row stride
               1: window(1).t().contiguous().t(),  # column-major
               2: window(2).clone()}  # contiguous
    want = torch.cat([window(r) for r in range(world_size)], -1)
    out["layouts"] = torch.equal(tpfuse.all_gather_hidden(layouts[rank], None), want)
    out["broadcast"] = torch.equal(tpfuse.all_gather_hidden(torch.full((1, 2), float(rank)).expand(3, 2), None),
                                   torch.cat([torch.full((3, 2), float(r)) for r in range(world_size)], -1))
    # T = 0 on every rank: no collective, an empty result; T = 0 on one rank only: refused alike.
    out["empty"] = tuple(tpfuse.all_gather_hidden(torch.ones(0, 3), None).shape)
    out["empty_on_one_rank"] = _outcome(lambda: tpfuse.all_gather_hidden(torch.ones(0 if rank == 0 else 2, 3)))
    return out


@pytest.fixture(scope="module")
def clean():
    return run_ranks(3, _clean, timeout=240)


def test_subgroups_names_layouts_and_empty_calls(clean):
    for rank, r in enumerate(clean):
        assert r.get("subgroup", True) and r["default_group"] and r["layouts"] and r["broadcast"], (rank, r)
        assert r["empty"] == (0, 9), (rank, r)
        kind, message, _ = r["empty_on_one_rank"]
        assert kind == "ValueError" and "leading dims [0]" in message and "leading dims [2]" in message, r


def _set_up_settings(rank, world_size):
    """The group facts' exchange (workspace.py) on gloo: every rank's dispatch settings are agreed at a
    group's set-up, so a CUDA call without TPFUSE_CHECK=1 cannot take a different path on one rank."""
    from tpfuse.compile_ops import workspace
    from tpfuse.compile_ops.groups import resolve_group

    out = {}
    cases = (("alike", "TPFUSE_PUSH_BLOCK_V", None), ("block_v", "TPFUSE_PUSH_BLOCK_V", "128" if rank == 1 else None),
             # read by the set-up itself: a bad value on one rank must not raise there alone
             ("bad_timeout", "TPFUSE_BARRIER_TIMEOUT_S", "soon" if rank == 1 else None),
             ("bad_switch", "TPFUSE_DISABLE_PUSH", "maybe" if rank == 0 else None))
    groups = [resolve_group(dist.new_group([0, 1], timeout=datetime.timedelta(seconds=GIVE_UP_S)).group_name)
              for _ in cases]
    for group, (name, variable, value) in zip(groups, cases):
        _env(variable, value)
        try:
            ws = workspace._establish(group, torch.device("cpu"))
            out[name] = ("ok", ws.facts.reason)
        except Exception as err:  # noqa: BLE001
            out[name] = (type(err).__name__, str(err))
        finally:
            _env(variable, None)
        dist.barrier()
    out["dispatch"] = _dispatch_settings(rank)
    return out


def _dispatch_settings(rank):
    """The agreement the op runs before a CUDA call's first dispatch on a group (agreement.agree_on_settings),
    here on gloo: settings apart raise on every rank; settings alike are agreed once and not exchanged again."""
    from tpfuse.compile_ops import agreement
    from tpfuse.compile_ops.groups import resolve_group

    group = resolve_group(dist.new_group([0, 1], timeout=datetime.timedelta(seconds=GIVE_UP_S)).group_name)
    _env("TPFUSE_BACKEND", "nccl" if rank == 1 else None)
    apart = _outcome(lambda: agreement.agree_on_settings(group, torch.device("cpu")))
    _env("TPFUSE_BACKEND", None)
    dist.barrier()
    alike = _outcome(lambda: agreement.agree_on_settings(group, torch.device("cpu")))
    # Agreed now: rank 0 asks again alone, and must not wait in an exchange (its peer makes none).
    again = _outcome(lambda: agreement.agree_on_settings(group, torch.device("cpu")) if rank == 0 else None)
    dist.barrier()
    return {"apart": apart[:2], "alike": alike[:2], "again": again}


def test_the_group_set_up_refuses_settings_that_differ():
    results = run_ranks(2, _set_up_settings, timeout=120)
    for r in results:
        assert r["alike"] == ("ok", "rank(s) [0, 1]: no CUDA device"), r  # the control: settings alike
        kind, message = r["block_v"]
        assert kind == "RuntimeError" and "TPFUSE_PUSH_BLOCK_V" in message and "rank 1" in message, r
        for case, says in (("bad_timeout", "rank 1: tpfuse: TPFUSE_BARRIER_TIMEOUT_S='soon'"),
                           ("bad_switch", "rank 0: tpfuse: TPFUSE_DISABLE_PUSH='maybe' must be 1")):
            assert r[case][0] == "ValueError" and says in r[case][1], (case, r)
    for case in ("block_v", "bad_timeout", "bad_switch"):
        assert results[0][case] == results[1][case], case
    for r in results:
        dispatch = r["dispatch"]
        assert dispatch["apart"][0] == "RuntimeError" and "TPFUSE_BACKEND='nccl'" in dispatch["apart"][1], dispatch
        assert dispatch["alike"] == ("ok", None) and dispatch["again"][:2] == ("ok", None), dispatch
        assert dispatch["again"][2] < GIVE_UP_S, dispatch
    assert results[0]["dispatch"]["apart"] == results[1]["dispatch"]["apart"]


# --------------------------------------------------------------------------- nccl_symmetric's kept launcher


class _Order:
    def __init__(self):
        self.lock = threading.Lock()

    def next_call(self, device_index):
        return 0, 1


def test_a_kept_nccl_symmetric_launcher_follows_the_group_s_current_windows(monkeypatch):
    """A launcher is kept per process (compile_ops/launchers.py): one rank may drop and remake it while its
    peer keeps the old one, so a launcher must not hold which windows a call moves through. Made before the
    windows grow and launched after, it must use the new windows, as every peer's new launcher does."""
    from types import SimpleNamespace

    from tpfuse.compile_ops.nccl_symmetric import launcher, windows

    state = windows.Windows(slab_bytes=1 << 20, send=torch.zeros(1 << 20, dtype=torch.uint8),
                            recv=torch.zeros(2 << 20, dtype=torch.uint8))
    ws = SimpleNamespace(group=SimpleNamespace(pg=None, name="g"), order=_Order(), status_view=None,
                         protocols={windows.NAME: state})
    used = []

    def all_gather(recv, send, group=None):  # two ranks with the same slab
        used.append((recv.data_ptr(), send.data_ptr()))
        recv.view(2, -1).copy_(send.view(1, -1).expand(2, -1))

    monkeypatch.setattr(launcher, "ensure_windows", lambda ws, slab: windows.windows_of(ws))
    monkeypatch.setattr(launcher, "all_gather_single", all_gather)
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    launch = launcher.launcher(ws, x, [3, 3])
    assert torch.equal(launch(x), torch.cat([x, x], -1))
    # The windows grow (a larger call of another shape, on every rank): the old pair is retired.
    state.retired.append((None, state.send, state.recv))
    state.send, state.recv = torch.zeros(2 << 20, dtype=torch.uint8), torch.zeros(4 << 20, dtype=torch.uint8)
    state.slab_bytes = 2 << 20
    assert torch.equal(launch(x + 1), torch.cat([x + 1, x + 1], -1))
    assert used[-1] == (state.recv.data_ptr(), state.send.data_ptr()), "the kept launcher used retired windows"


# --------------------------------------------------------------------------- switches that parse


@pytest.mark.parametrize("name", ["TPFUSE_CHECK", "TPFUSE_DISABLE_PUSH", "TPFUSE_ENABLE_MULTIMEM"])
def test_a_switch_with_an_unknown_value_is_an_error_not_a_guess(monkeypatch, name):
    """Before, TPFUSE_CHECK=off turned the check on (any text but 0/false/no was on) and
    TPFUSE_ENABLE_MULTIMEM=true left multicast off without a word."""
    from tpfuse import config

    for value, meant in (("1", True), ("0", False), ("", False)):  # the controls: the spellings the docs use
        monkeypatch.setenv(name, value)
        assert config.get(name) is meant, (name, value)
    for value in ("off", "true", "enable", "2"):
        if name != "TPFUSE_ENABLE_MULTIMEM" and value in ("off", "true"):
            monkeypatch.setenv(name, value)
            assert config.get(name) is (value == "true"), (name, value)  # the words a switch also takes
            continue
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=rf"{name}='{value}' must be 1"):
            config.get(name)
