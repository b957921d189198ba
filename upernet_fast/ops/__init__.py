"""Functional entry points. Each takes ``backend=`` ("auto", "eager", "triton", "cpp") and supports autograd.

Importing this package registers every op's implementations with :mod:`upernet_fast.backend`.
"""

from upernet_fast.ops.adaptive_avg_pool_multi import adaptive_avg_pool_multi
from upernet_fast.ops.bn_relu import bn_relu
from upernet_fast.ops.conv_bn_relu import ConvBNReLU, conv_bn_relu
from upernet_fast.ops.upsample_add import upsample_add
from upernet_fast.ops.upsample_concat import upsample_concat
from upernet_fast.ops.upsample_cross_entropy import upsample_cross_entropy

__all__ = [
    "ConvBNReLU",
    "adaptive_avg_pool_multi",
    "bn_relu",
    "conv_bn_relu",
    "upsample_add",
    "upsample_concat",
    "upsample_cross_entropy",
]
