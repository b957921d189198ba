"""upernet_fast: a fused-kernel UperNet head for PyTorch, drop-in for transformers' UperNetForSemanticSegmentation."""

from upernet_fast.backend import get_backend, set_backend
from upernet_fast.ops import ConvBNReLU

__version__ = "0.1.0"

__all__ = ["ConvBNReLU", "get_backend", "set_backend", "__version__"]
