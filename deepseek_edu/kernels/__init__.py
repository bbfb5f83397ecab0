"""Triton kernels for DeepSeek-V3's FP8 recipe and MLA decoding (chapter 09).

One kernel per module, each beside its launcher and its plain-PyTorch `_ref` twin:

- `act_quant`: activations to E4M3, one FP32 scale per 1 x 128 tile (V3 §3.3.2);
- `weight_quant` / `weight_dequant`: weights, one scale per 128 x 128 block;
- `fp8_gemm`: blockwise-scaled FP8 GEMM, FP32 accumulation promoted per 128-wide K block (V3 §3.3.2);
- `mla_decode`: absorbed MLA decoding over the latent cache, split over the sequence and combined
  (flash-decoding), with a bf16 cache or FlashMLA's 656-byte FP8 cache.

Importing this package never needs Triton; calling a launcher without it raises
`TritonUnavailableError` naming the `_ref` function to use instead. On a machine without CUDA the
kernels run in Triton's CPU interpreter (see `_triton`).
"""

from ._triton import HAS_TRITON, TritonUnavailableError
from .act_quant import FP8_E4M3_MAX, act_quant, act_quant_ref
from .fp8_gemm import fp8_gemm, fp8_gemm_ref
from .mla_decode import FP8_CACHE_BYTES_PER_TOKEN, mla_decode, mla_decode_ref, quantize_mla_cache
from .weight_quant import weight_dequant, weight_dequant_ref, weight_quant, weight_quant_ref

__all__ = [
    "FP8_CACHE_BYTES_PER_TOKEN", "FP8_E4M3_MAX", "HAS_TRITON", "TritonUnavailableError",
    "act_quant", "act_quant_ref", "fp8_gemm", "fp8_gemm_ref", "mla_decode", "mla_decode_ref",
    "quantize_mla_cache", "weight_dequant", "weight_dequant_ref", "weight_quant", "weight_quant_ref",
]
