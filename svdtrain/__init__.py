"""svdtrain: make any PyTorch model low-rank by SVD training.

decompose_ → train with orthogonality_loss + sparsity_loss (+ channel_sparsity_loss) → prune_ (→ recalibrate_bn)
→ fine-tune → export.
"""

from .attention import SplitMultiheadAttention
from .channels import channel_groups
from .config import SVDConfig
from .decompose import decompose_
from .export import export, export_layout, rebuild
from .layers import SVDConv, SVDLinear
from .prune import prune_
from .recalibrate import recalibrate_bn
from .regularizers import channel_sparsity_loss, orthogonality_loss, sparsity_loss
from .stats import count_flops, count_params, summary

__version__ = "0.1.0"

__all__ = [
    "SVDConfig",
    "SVDConv",
    "SVDLinear",
    "SplitMultiheadAttention",
    "channel_groups",
    "channel_sparsity_loss",
    "count_flops",
    "count_params",
    "decompose_",
    "export",
    "export_layout",
    "orthogonality_loss",
    "prune_",
    "rebuild",
    "recalibrate_bn",
    "sparsity_loss",
    "summary",
]
