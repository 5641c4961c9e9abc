"""Graph passes: decide what to rewrite and where a barrier is provably redundant."""
