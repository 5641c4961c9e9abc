"""Triton kernels that move the bytes (push gather, barriers). Pure Triton: no torch imports here."""
