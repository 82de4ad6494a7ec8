"""Sparse autoencoders: model, losses, data streaming, checkpoints and the training loop."""

from .checkpoint import import_conceptscope_pt, import_saelens, load_sae, save_sae
from .config import SAEConfig
from .model import SparseAutoencoder, fold_input_scale
from .trainer import TrainResult, train_sae

__all__ = ["SAEConfig", "SparseAutoencoder", "TrainResult", "fold_input_scale", "import_conceptscope_pt",
           "import_saelens", "load_sae", "save_sae", "train_sae"]
