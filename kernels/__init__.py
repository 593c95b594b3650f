"""Compute kernels of the engine: each op has a plain-PyTorch reference that runs anywhere, and a
Triton version for CUDA behind the same function. Callers use the functions exported here; the
dispatch picks the implementation from the tensor's device.

Kernels know only tensors: nothing here imports the engine, the queue or the store.
"""

from kernels.activation import silu_and_mul
from kernels.attention import paged_attention, write_kv
from kernels.metadata import AttnMetadata
from kernels.norm import fused_add_rms_norm, rms_norm
from kernels.rotary import apply_rotary, rotary_cos_sin
from kernels.sampling import sample

__all__ = [
    "AttnMetadata",
    "apply_rotary",
    "fused_add_rms_norm",
    "paged_attention",
    "rms_norm",
    "rotary_cos_sin",
    "sample",
    "silu_and_mul",
    "write_kv",
]
