"""Tolerances for comparing two float32 computations of the same quantity that sum in different orders.

Where the code under test runs in float64 the suite compares in float64 (`.double()` modules and inputs, seeded).
Where it cannot (ComfyUI runs its models in its own inference dtypes), two paths that are equal in exact arithmetic
still differ by float32 rounding, and by how much depends on the order of every sum: other kernels (bypass LoRA vs
W + delta, batched vs one at a time, recomputed per block) and other processors (AVX-512 vs AVX2 kernels block
their sums differently; CI runs on both). A fixed atol of 1e-6 is one such rounding, not a bound on it.

A sum of n products of size m carries a rounding error of about eps * sqrt(n) * m (a random walk of n roundings of
eps * m each; the worst case is n instead of sqrt(n)); through a network's layers these add up, and the largest of
many elements sits in the tail. So: atol = k * eps * sqrt(n) * m, with n the longest reduction of one layer, m the
scale of the compared values (their largest magnitude: normalised layers keep activations at that scale) and k a
margin of a few units for depth and tails. Each use states n and k, and the error a real bug would give, which
must stay orders of magnitude above it.
"""
import math

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2 ** -23: float32's relative rounding step


def float32_atol(magnitude, reduction, k=4.0):
    """k * eps32 * sqrt(reduction) * magnitude: the absolute difference two float32 summation orders can leave."""
    return k * EPS32 * math.sqrt(reduction) * float(magnitude)


def assert_close_float32(actual, expected, reduction, k=4.0, magnitude=None):
    """assert_close with `float32_atol` (magnitude: max |expected| unless given) and no relative term."""
    magnitude = expected.abs().max().item() if magnitude is None else magnitude
    torch.testing.assert_close(actual, expected, rtol=0, atol=float32_atol(magnitude, reduction, k))
