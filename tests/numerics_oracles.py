"""Bounds for comparisons whose numbers depend on the CPU's kernels (imported by the tests; not a test module).

No bound here is a value one machine printed: INT8 and FP16 results differ between instruction sets (AVX2,
AVX-512, VNNI, AMX) and ONNX Runtime's graph fusions, so each bound is derived from a control or from the
format's rounding."""

from __future__ import annotations

import numpy as np

# FP16 keeps every weight and activation to a relative 2^-11 (4.9e-4); through resnet18's ~20 layers that adds up
# to about 1 % of the largest logit. A broken conversion (overflow, a float32 buffer read as float16) is off by
# O(1): 5 % separates the two.
FP16_MAX_REL_LOGIT_ERROR = 0.05


def fp16_logit_bound(reference: np.ndarray) -> float:
    """The largest |Δlogit| an FP16 graph may show against FP32 `reference` logits (at least 1 logit unit's 5 %)."""
    return FP16_MAX_REL_LOGIT_ERROR * max(1.0, float(np.abs(reference).max()))


def agreement_floor(reference_pred: np.ndarray) -> float:
    """The least top-1 agreement with `reference_pred` a quantized or half-precision copy may have: halfway between
    an exact copy (1) and the control that ignores the image and always answers the reference's most frequent
    class. A quantization that destroyed the features (wrong channel axis, zero points read wrong, activations
    clipped by a one-group range) lands near that control; a working one, on any CPU, near 1."""
    control = np.bincount(reference_pred).max() / len(reference_pred)
    return (1.0 + control) / 2
