"""Triton kernels that move the bytes. Pure Triton: no torch imports here.

One package per protocol (docs/design.md, "One package per protocol"): ``barrier/`` (the barrier
push and its multicast variant) and ``flag/`` (the flag protocol).  Shared by every push kernel:
``failure.py`` (the status word's codes and the poison), ``peer_args.py`` (peer addresses as
scalar arguments) and ``compiler.py``.  ``linear_push.py`` is the fused linear + push kernel,
built on the barrier protocol's device functions.
"""
