"""TensorBoard event files for a run (`tensorboard --logdir runs`): every step's training loss and
learning rate, and each epoch's training and validation loss and accuracy, under
RUN_DIR/tensorboard/."""

from __future__ import annotations

from pathlib import Path


class Logbook:
    """Writes what `fit` reports after each epoch; a resumed run appends to the same folder."""

    def __init__(self, folder: Path):
        # imports tensorboard: only when a run writes
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def epoch(self, history: list[dict], step_losses: list[float], step_lrs: list[float]) -> None:
        row = history[-1]
        # every epoch of both phases has the same number of steps
        first = (row["epoch"] - 1) * len(step_losses)
        for i, (loss, lr) in enumerate(zip(step_losses, step_lrs)):
            self.writer.add_scalar("step/train_loss", loss, first + i)
            self.writer.add_scalar("step/learning_rate", lr, first + i)
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            self.writer.add_scalar(f"epoch/{key}", row[key], row["epoch"])
        self.writer.add_scalar("epoch/phase", row["phase"], row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
