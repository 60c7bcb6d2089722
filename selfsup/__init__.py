"""selfsup: self-supervised pretraining for vision on Lightning and timm.

Public API: the base class, the methods, the encoder and the data module.
"""

import warnings

# Lightning 2.6 under torch 2.14 warns about torch.utils._pytree.LeafSpec; harmless, silenced by name.
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)

from selfsup.data.datamodule import Batch, SSLDataModule  # noqa: E402
from selfsup.export import load_encoder  # noqa: E402
from selfsup.methods.base import SSLMethod  # noqa: E402
from selfsup.methods.mae import MAE  # noqa: E402
from selfsup.methods.simclr import SimCLR  # noqa: E402
from selfsup.methods.simmim import SimMIM  # noqa: E402
from selfsup.methods.swav import SwAV  # noqa: E402
from selfsup.models.encoder import Encoder  # noqa: E402
from selfsup.models.heads import MLP  # noqa: E402

__all__ = ["Batch", "Encoder", "MAE", "MLP", "SSLDataModule", "SSLMethod", "SimCLR", "SimMIM", "SwAV", "load_encoder"]
__version__ = "0.1.0"
