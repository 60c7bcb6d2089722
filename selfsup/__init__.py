"""selfsup: self-supervised pretraining for vision on Lightning and timm.

Public API: the base class, the methods, the encoder, the data module and encoder loading.
"""

from selfsup.checkpoint import load_encoder
from selfsup.data.datamodule import Batch, SSLDataModule
from selfsup.methods.barlowtwins import BarlowTwins
from selfsup.methods.base import SSLMethod
from selfsup.methods.byol import BYOL
from selfsup.methods.mae import MAE
from selfsup.methods.mocov3 import MoCoV3
from selfsup.methods.simclr import SimCLR
from selfsup.methods.simmim import SimMIM
from selfsup.methods.swav import SwAV
from selfsup.methods.vicreg import VICReg
from selfsup.models.encoder import Encoder
from selfsup.models.heads import MLP
from selfsup.models.teacher import EMATeacher

__all__ = ["BYOL", "BarlowTwins", "Batch", "EMATeacher", "Encoder", "MAE", "MLP", "MoCoV3", "SSLDataModule",
           "SSLMethod", "SimCLR", "SimMIM", "SwAV", "VICReg", "load_encoder"]
__version__ = "0.1.0"
