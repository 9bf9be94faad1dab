"""The Triton path of training: the same interface as :mod:`c2c_kernels.training.torch_ops`,
one file per kernel. GEMMs stay with torch (cuBLAS); these kernels fuse what sits between them."""
from ..torch_ops import accumulation_dtype
from .dropout import dropout_add, dropout_grad
from .gated_merge import gated_merge, gated_merge_backward
from .gelu import gelu, gelu_backward
from .rms_norm import rms_norm, rms_norm_backward

__all__ = ["accumulation_dtype", "rms_norm", "rms_norm_backward", "gelu", "gelu_backward", "dropout_add",
           "dropout_grad", "gated_merge", "gated_merge_backward"]
