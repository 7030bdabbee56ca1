"""Lightning training: the module, the data module, callbacks and the run directory."""

from protogmm.training.datamodule import SSLDataModule
from protogmm.training.module import PrototypicalSSL

__all__ = ["PrototypicalSSL", "SSLDataModule"]
