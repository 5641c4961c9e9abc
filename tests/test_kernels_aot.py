"""Ahead-of-time compilation of the push kernels for sm_90 (no GPU needed).

The multimem kernel never runs on our machines (docs/safety.md, "Multicast"), so this is where
it is checked; the P2P kernel is checked for 16-byte stores and for the
barrier's memory orders; the flag kernel for whole-unit polls.  Both compile under the
installed Triton and under the GPU machines' Triton 3.6 (``TPFUSE_TRITON36_PATH``), which
rejects some loops that newer releases accept (docs/design.md, "Toolchain note").
"""

import re

import pytest

import aot_kernels_report as aot
import interpreter_support

pytest.importorskip("triton")


#: a volatile load of 64-bit elements, alone or as a vector: each unit is one single-copy-atomic access
_WHOLE_UNIT_LOAD = re.compile(r"ld\.volatile\.global(?:\.v\d+)?\.[bsu]64")


def assert_polls_read_whole_units(name, kernel):
    """The flag wait reads each 8-byte unit (data in the low half, flag in the high half) with ONE
    volatile load of 64-bit elements, so that flag and data come from the same store
    (docs/flag_protocol.md). Two 32-bit loads could pair a new flag with old data."""
    polls = kernel["poll_loads"]  # the volatile loads in the %globaltimer-bounded wait loops
    assert polls, f"{name}: no volatile load in a %globaltimer-bounded loop: the poll was not found"
    split = [load for load in polls if not _WHOLE_UNIT_LOAD.fullmatch(load)]
    assert not split, f"{name}: the poll reads units with {split}; accepted is one 64-bit volatile load per unit"


def _check(report):
    kernels = report["kernels"]
    for name, elem, rank, offsets, vec, skip, copy_out in aot.P2P_CONFIGS:
        k = kernels["p2p_" + name]
        ins = set(k["instructions"])
        assert k["cubin_bytes"] > 0
        if elem * vec == 16:
            assert any(i.startswith("st.global.v4") for i in ins), (name, ins)
            assert any(i.startswith("ld.global.v4") for i in ins), (name, ins)
        # Exit barrier: release on signal, acquire on wait, system scope.
        assert any(i.startswith(("red.", "atom.")) and ".sys" in i and "release" in i for i in ins), (name, ins)
        assert any(i.startswith("atom.") and ".sys" in i and "acquire" in i for i in ins), (name, ins)
        assert not any(i.startswith("multimem") for i in ins), name
        assert k["globaltimer"], f"{name}: the barrier spin must be bounded by %globaltimer"
    for name, *_ in aot.MULTIMEM_CONFIGS:
        k = kernels["multimem_" + name]
        assert any(i.startswith("multimem.st") for i in k["instructions"]), k["instructions"]
        assert k["cubin_bytes"] > 0
        assert k["globaltimer"]
    for name, dtype, rank, offsets, k_dim, tokens, bias, skip, multimem, copy_out in aot.LINEAR_CONFIGS:
        k = kernels["linear_" + name]
        ins = set(k["instructions"])
        config = k["config"]
        assert k["cubin_bytes"] > 0, name
        # The GEMM runs on tensor cores (mma.sync for 16-row tiles, wgmma for 64).
        assert any(i.startswith(("mma.", "wgmma.")) for i in ins), (name, ins)
        # Exit barrier: release on signal, acquire on wait, system scope; the spin is bounded.
        assert any(i.startswith(("red.", "atom.")) and ".sys" in i and "release" in i for i in ins), (name, ins)
        assert any(i.startswith("atom.") and ".sys" in i and "acquire" in i for i in ins), (name, ins)
        assert k["globaltimer"], name
        assert k["shared_bytes"] <= 227 * 1024, (name, k["shared_bytes"])  # one block per SM must fit
        if multimem:
            assert any(i.startswith("multimem.st") for i in ins), (name, ins)
        else:
            assert not any(i.startswith("multimem") for i in ins), name
            # A tile of >= 8 elements per thread is stored in 16-byte vectors (local and remote).
            if config["BLOCK_M"] * config["BLOCK_N"] >= 8 * 32 * config["num_warps"]:
                assert any(i.startswith("st.global.v4") for i in ins), (name, config, ins)
    for name, *_ in aot.FLAG_CONFIGS:
        k = kernels["flag_" + name]
        ins = set(k["instructions"])
        assert k["cubin_bytes"] > 0, name
        # Every unit crosses the link as half of a 16-byte relaxed system-scope store ...
        assert "st.relaxed.sys.global.v2.b64" in ins, (name, ins)
        # ... and the receiver polls its own buffer with system-coherent loads, a whole unit each ...
        assert_polls_read_whole_units(name, k)
        # ... with no fence, no atomic and no release anywhere: no barrier round trip.
        assert not any(i.startswith(("fence", "membar", "atom", "red.")) or "release" in i for i in ins), (name, ins)
        assert not any(i.startswith("multimem") for i in ins), name
        assert k["globaltimer"], f"{name}: the flag wait must be bounded by %globaltimer"
    for name, kind, variant, _ in aot.SOFTMAX_CONFIGS:
        k = kernels["softmax_" + name]
        ins = set(k["instructions"])
        assert k["cubin_bytes"] > 0 and k["shared_bytes"] <= 227 * 1024, name
        # No atomic and no fence: each result is written by one program in a fixed order, so the merge
        # gives every rank the same bits, and the slab's kernels do not communicate.
        assert not any(i.startswith(("atom", "red.", "fence", "membar", "multimem")) for i in ins), (name, ins)
        if kind in ("local", "grad", "cross_entropy_grad") and variant[-1]:  # aligned: rows in 16-byte vectors
            assert any(i.startswith("ld.global.v4") for i in ins), (name, ins)
            if kind != "local":
                assert any(i.startswith("st.global.v4") for i in ins), (name, ins)
    for name, kernel, dtype, largest, k, aligned in aot.VOCAB_REDUCE_CONFIGS:
        compiled = kernels["vocab_" + name]
        ins = set(compiled["instructions"])
        assert compiled["cubin_bytes"] > 0 and compiled["shared_bytes"] <= 227 * 1024, name
        if aligned:  # whole tiles of the slab in 16-byte loads
            assert "ld.global.v4.b32" in ins, (name, ins)
        # Plain loads and stores between the exchange's collectives: no atomic, fence or wait.
        assert not any(i.startswith(("atom", "red.", "fence", "membar", "multimem")) for i in ins), (name, ins)
        assert not compiled["globaltimer"], name
    # The poll check itself: it accepts a test-only wait that reads each unit whole and rejects the
    # same wait reading each unit as two int32 halves (negative control).
    assert_polls_read_whole_units("poll_control_whole", kernels["poll_control_whole"])
    with pytest.raises(AssertionError, match="the poll reads units with"):
        assert_polls_read_whole_units("poll_control_split", kernels["poll_control_split"])
    for name, *_, options in aot.LINEAR_VARIANT_CONFIGS:  # every option spelled out, none left to launch_config
        k = kernels["linear_" + name]
        ins = set(k["instructions"])
        assert k["shared_bytes"] <= 227 * 1024, (name, k["shared_bytes"])
        if options["TMA"]:
            # the weight tiles come through TMA (bulk tensor copies); each block builds its descriptor in scratch
            assert any(i.startswith("cp.async.bulk.tensor") for i in ins), (name, ins)
            assert k["global_scratch_bytes"] > 0, name
        if options["SWAP_AB"]:
            # the weight tile is the MMA's M side: Hopper's warpgroup MMA, not mma.sync (8 to 32 tokens)
            assert any(i.startswith("wgmma.") for i in ins), (name, ins)
            assert not any(i.startswith("mma.") for i in ins), (name, ins)
        else:  # 8 to 32 tokens on the M side: mma.sync
            assert any(i.startswith("mma.") for i in ins) and not any(i.startswith("wgmma.") for i in ins), name


def test_kernels_compile_for_sm90_with_installed_triton():
    _check(aot.report())


def test_kernels_compile_for_sm90_with_triton_36():
    _check(interpreter_support.triton36_report("aot_kernels_report.py"))


def _interpret(*flags):
    return interpreter_support.interpret("interpret_linear_push.py", *flags, timeout=300)


def test_fused_linear_push_kernel_computes_and_places_bands_in_the_interpreter():
    """The fused kernel's arithmetic and data movement, run by Triton's CPU interpreter
    (W ranks simulated in one process; barriers off, see interpret_linear_push.py)."""
    pytest.importorskip("torch")
    results = _interpret()
    assert results and all(r["within_tolerance"] and r["ranks_agree"] for r in results), results
    assert any(r["tiles"] > r["nblocks"] for r in results)  # some block took several tiles


def test_fused_linear_push_zero_copy_in_the_interpreter():
    """Zero-copy: no copy-out, every rank's slot is its result once every rank pushed (one pass);
    rank 0's slot read before its peers ran is incomplete (the check can fail)."""
    pytest.importorskip("torch")
    results = _interpret("--zero-copy")
    assert results and all(r["within_tolerance"] and r["ranks_agree"] for r in results), results
    assert not any(r["first_alone_complete"] for r in results), results


def test_fused_linear_push_tma_weight_in_the_interpreter():
    """The experimental TMA weight loads: same results, uneven bands included (the box past a band is zeros)."""
    pytest.importorskip("torch")
    results = _interpret("--tma")
    assert results and all(r["tma"] for r in results), results
    assert all(r["within_tolerance"] and r["ranks_agree"] for r in results), results


def test_fused_linear_push_swap_ab_in_the_interpreter():
    """Swap-AB (the transposed tile, then its transpose): same results on every case, with and without TMA."""
    pytest.importorskip("torch")
    for flags in (["--swap-ab"], ["--swap-ab", "--tma"]):
        results = _interpret(*flags)
        assert results and all(r["swap_ab"] for r in results), results
        assert all(r["within_tolerance"] and r["ranks_agree"] for r in results), (flags, results)


def test_fused_linear_push_balanced_shares_in_the_interpreter():
    """Even column shares per block, with swap-AB, and zero-copy; the one-pass negative
    control still finds the later ranks' bands missing."""
    pytest.importorskip("torch")
    for flags in (["--balanced"], ["--balanced", "--swap-ab"], ["--balanced", "--zero-copy"]):
        results = _interpret(*flags)
        assert results and all(r["balanced"] for r in results), results
        assert all(r["within_tolerance"] and r["ranks_agree"] for r in results), (flags, results)
    assert not any(r["within_tolerance"] for r in _interpret("--balanced", "--one-pass"))


def test_column_shares_partition_the_band():
    """``_column_range`` (BALANCED), run by the interpreter: every column in exactly one block's share,
    shares contiguous and in block order, 16-byte aligned starts (empty shares sit at the band's end),
    sizes within 8 columns of each other."""
    pytest.importorskip("torch")
    for case in _interpret("--shares"):
        width, ranges = case["width"], case["ranges"]
        assert len(ranges) == case["nblocks"]
        assert ranges[0][0] == 0 and ranges[-1][1] == width, case
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), case
        assert all(c0 <= c1 and (c0 % 8 == 0 or c0 == c1 == width) for c0, c1 in ranges), case
        sizes = [c1 - c0 for c0, c1 in ranges]
        assert max(sizes) - min(sizes) <= 8, (width, sizes)
        if width >= 8 * case["nblocks"]:
            assert min(sizes) > 0, case  # every block has columns when there are enough


def test_fused_linear_push_interpreter_negative_control():
    """One pass: a rank copies out before the later ranks pushed, so their bands are missing."""
    pytest.importorskip("torch")
    results = _interpret("--one-pass")
    assert not any(r["within_tolerance"] for r in results), results


def test_interpreter_skip_only_where_triton_36_meets_numpy_24():
    assert interpreter_support.skip_reason("3.6.0", "2.4.6").startswith("Triton 3.6.0's interpreter")
    assert interpreter_support.skip_reason("3.6.0", "2.3.5") is None
    assert interpreter_support.skip_reason("3.7.0", "2.4.0") is None
    assert interpreter_support.skip_reason("3.9.0+git1234", "2.4.6") is None


def test_interpreter_buffers_sit_above_4_gib():
    """The peers' buffers go to the kernels as integers: below 4 GiB the interpreter would type them
    as 32-bit values, whose cast to a pointer it cannot do (interpreter_support.py)."""
    torch = pytest.importorskip("torch")
    bufs = [interpreter_support.addressed(n, dtype, 7) for n, dtype in [(1, torch.int32), (4099, torch.float16)]]
    assert all(b.data_ptr() >= 2**32 and b.data_ptr() % 16 == 0 for b in bufs)
    assert all(bool((b == 7).all()) for b in bufs) and [b.numel() for b in bufs] == [1, 4099]
