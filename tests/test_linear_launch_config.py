"""The fused kernel's launch configs and the token buckets they are compiled for (no GPU).

The host launcher compiles one kernel per token bucket (``compile_ops.linear_push.token_bucket``)
and runs it at the call's T: the bucket's config must be the one ``launch_config`` picks for
that T, or a call would run tiles chosen for another T.
"""

import pytest

from tpfuse.compile_ops.linear_push import token_bucket
from tpfuse.kernels import linear_push

#: (K, widths): LM heads at W=4 and 2 (wide bands), the Llama-8B MLP and the EAGLE3 projection at W=4, uneven
SHAPES = [(4096, [32064] * 4), (7168, [64640] * 2), (4096, [3584] * 4), (21504, [1792] * 4),
          (4096, [16384, 16384, 16384, 16000])]


def _tiles_aside(config):
    return {k: v for k, v in config.items() if k != "tiles"}


@pytest.mark.parametrize("k,widths", SHAPES)
def test_bucket_config_is_the_config_of_every_t_in_it(k, widths):
    """Up to T=128 the bucket's config is T's own.  Above, every T runs the T=256 config: the
    rule never fuses there (only TPFUSE_LINEAR_PUSH=fused does), the kernel loops over any
    number of M tiles, and one compiled variant serves every prefill size.  (For a narrow
    band that is not launch_config(T)'s pick at every T: at T=257 the 3584-column band of the
    Llama-8B MLP would count as wide.)"""
    for tokens in range(1, 301):
        bucket = token_bucket(tokens)
        assert bucket >= tokens if tokens <= 128 else bucket == 256, (tokens, bucket)
        expected = linear_push.launch_config(tokens if tokens <= 128 else 256, k, widths)
        assert _tiles_aside(linear_push.launch_config(bucket, k, widths)) == _tiles_aside(expected), \
            (k, widths, tokens, bucket)


@pytest.mark.parametrize("k,widths", SHAPES)
def test_pipeline_fits_its_budget(k, widths):
    for tokens in (1, 8, 16, 17, 24, 25, 32, 64, 128, 300):
        c = linear_push.launch_config(tokens, k, widths)
        stages_bytes = (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * 2 * (c["num_stages"] - 1)
        assert stages_bytes <= linear_push.PIPELINE_BYTES or c["BLOCK_K"] == 64, (tokens, c)


def test_lm_head_32_row_tiles_switch_width_after_mid_tokens():
    """32-row tiles: 128 columns (8 warps, 4 stages) up to MID_TOKENS, 64 (4 warps, 6 stages) above:
    the fifth sweep's measurements (kernels/linear_push.py: launch_config)."""
    widths = [32064] * 4
    mid = linear_push.MID_TOKENS
    for tokens in range(17, mid + 1):
        c = linear_push.launch_config(tokens, 4096, widths)
        assert (c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"], c["SWAP_AB"], c["BALANCED"]) == \
            (32, 128, 8, 4, True, False), (tokens, c)
    for tokens in range(mid + 1, 33):
        c = linear_push.launch_config(tokens, 4096, widths)
        assert (c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"], c["SWAP_AB"]) == \
            (32, 64, 4, 6, True), (tokens, c)
    assert token_bucket(mid) == token_bucket(17) != token_bucket(mid + 1) == token_bucket(32)
