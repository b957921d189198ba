"""upernet_fast: a fused-kernel UperNet head for PyTorch, drop-in for transformers' UperNetForSemanticSegmentation.

Quick use::

    import upernet_fast
    model = upernet_fast.convert(transformers_model)      # in place; same parameters, outputs, gradients
    model = upernet_fast.UperNetForSemanticSegmentation.from_pretrained(local_dir)

See ``upernet-fast info`` for which backend each op uses here and why the others are off.
"""

from upernet_fast import ops, reference
from upernet_fast.backend import get_backend, set_backend
from upernet_fast.convert import convert, load_mmseg_state_dict, revert, set_backend_of
from upernet_fast.modeling import UperNetFCNHead, UperNetForSemanticSegmentation, UperNetHead
from upernet_fast.ops import ConvBNReLU

__version__ = "0.1.0"

__all__ = [
    "ConvBNReLU",
    "UperNetFCNHead",
    "UperNetForSemanticSegmentation",
    "UperNetHead",
    "__version__",
    "convert",
    "get_backend",
    "load_mmseg_state_dict",
    "ops",
    "reference",
    "revert",
    "set_backend",
    "set_backend_of",
]
