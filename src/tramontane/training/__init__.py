"""Training: the DP-SGD / non-private loop, resumable checkpoints that carry the privacy ledger."""

from tramontane.dp.objective import Objective  # lives in dp/ (the engine's step takes it)
from tramontane.training.state import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from tramontane.training.trainer import TrainConfig, Trainer, TrainResult

__all__ = ["Objective", "TrainConfig", "TrainResult", "TrainState", "Trainer", "latest_checkpoint",
           "load_checkpoint", "save_checkpoint"]
