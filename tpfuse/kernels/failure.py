"""How a push call fails: the status word's codes, and the poison a failed call leaves in its result.

This module is the one home of both (docs/contract.md, "A failed call never
yields data"; docs/safety.md, "Timeouts").  Every push kernel (flag protocol,
the barrier protocol's p2p push, fused linear + push, multicast) uses it the same way:

**Status word.**  Each group workspace has a host-mapped ``int32[STATUS_WORDS]``
status.  A wait that gives up writes ``code(kind, block, peer)`` into word 0
(first writer wins: a later wait of a failed call may give up at once and name
another peer) and the call's host-issued number into word 1, so the host
reads, without synchronising, which wait of which call was left waiting for
which rank.  ``describe`` decodes it; nothing else does.

**Poison.**  A block whose wait gave up overwrites the call's *whole* result
with the dtype's poison pattern (``poison_bits``) after its own copy-out, so a
timed-out call never returns another call's bytes or uninitialised memory.
Blocks of the same call that did receive their tiles may finish after the
poisoning block and write their (correct) tiles over the poison: every element
of the result is then either poison or this call's correct value, and the
elements the missing peer never delivered are always poison.

No torch import here: CI compiles the kernels ahead of time in processes that
may not have torch.
"""

import triton
import triton.language as tl

#: int32 words of a workspace's status: the failure code, then the failed call's number
STATUS_WORDS = 2

# Which wait gave up (the code's top byte).
ENTRY_TIMEOUT = tl.constexpr(1)
EXIT_TIMEOUT = tl.constexpr(2)
FLAG_TIMEOUT = tl.constexpr(3)
KIND_NAMES = {1: "entry barrier", 2: "exit barrier", 3: "flag wait"}

#: elements one block poisons per step
_POISON_BLOCK = tl.constexpr(1024)

#: the poison bit pattern of each dtype (by torch's name without "torch."): a quiet NaN for every
#: floating dtype; for integers the value a real gather rarely holds: the signed minimum, 255 for uint8
POISON_BITS = {
    "float32": 0x7FC00000,
    "float16": 0x7FC0,  # a NaN in fp16 and in bf16
    "bfloat16": 0x7FC0,
    "float8_e4m3fn": 0x7F,
    "float8_e5m2": 0x7F,
    "int32": -(1 << 31),
    "int16": -(1 << 15),
    "int8": -(1 << 7),
    "uint8": 0xFF,
}
#: the NaN pattern of each element size, for callers that know only the size (the ahead-of-time tests)
NAN_BITS_OF_SIZE = {1: 0x7F, 2: 0x7FC0, 4: 0x7FC00000}


def poison_bits(dtype_name: str, elem_size: int) -> int:
    """The poison pattern of a dtype, as a signed integer of ``elem_size`` bytes (what the kernels store)."""
    bits = POISON_BITS.get(dtype_name)
    if bits is None:
        raise ValueError(f"tpfuse: no poison pattern for dtype {dtype_name}; known are {sorted(POISON_BITS)}")
    bits &= (1 << (8 * elem_size)) - 1
    return bits - (1 << (8 * elem_size)) if bits >> (8 * elem_size - 1) else bits


def poison_word(dtype_name: str, elem_size: int) -> int:
    """The poison of a dtype repeated over one signed 32-bit word (kernels that move words, not elements)."""
    unsigned = poison_bits(dtype_name, elem_size) & ((1 << (8 * elem_size)) - 1)
    word = 0
    for i in range(4 // elem_size):
        word |= unsigned << (8 * elem_size * i)
    return word - (1 << 32) if word >> 31 else word


def code(kind: int, block: int, peer: int) -> int:
    """The status code of a wait of ``kind`` in ``block`` that gave up on ``peer`` (host side, for tests)."""
    return kind * (1 << 24) + block * 256 + peer + 1


def describe(code_word: int) -> tuple[str, int, int]:
    """(which wait, block, missing peer) of a non-zero status code."""
    kind, block, peer = code_word >> 24, (code_word >> 8) & 0xFFFF, (code_word & 0xFF) - 1
    return KIND_NAMES.get(kind, f"unknown wait (kind {kind})"), block, peer


# --------------------------------------------------------------------------- device side


@triton.jit
def record_timeout(status, KIND: tl.constexpr, block, peer):
    """Keep the first report only.  Plain load and store: the status lives in host-mapped memory,
    where atomics are not guaranteed over PCIe; any of the racing first writers' codes is a correct report."""
    if tl.load(status, volatile=True) == 0:
        tl.store(status, block * 256 + peer + (KIND * 16777216 + 1))


@triton.jit
def poison_result(out_ptr, status, call, n, POISON: tl.constexpr):
    """Overwrite the ``n`` elements at ``out_ptr`` (the call's whole result) with POISON bits, and name the call.

    Called by a block whose wait gave up, after its own stores to the result:
    the CTA barrier orders every thread's earlier stores before the poison.
    """
    BITS: tl.constexpr = out_ptr.dtype.element_ty.primitive_bitwidth
    tl.debug_barrier()
    if BITS == 8:
        ptr = out_ptr.to(tl.pointer_type(tl.int8))
        value = tl.full([_POISON_BLOCK], POISON, tl.int8)
    elif BITS == 16:
        ptr = out_ptr.to(tl.pointer_type(tl.int16))
        value = tl.full([_POISON_BLOCK], POISON, tl.int16)
    else:
        ptr = out_ptr.to(tl.pointer_type(tl.int32))
        value = tl.full([_POISON_BLOCK], POISON, tl.int32)
    for start in range(0, n, _POISON_BLOCK):
        i = start + tl.arange(0, _POISON_BLOCK)
        tl.store(ptr + i, value, mask=i < n)
    if tl.load(status + 1, volatile=True) == 0:
        tl.store(status + 1, call)
