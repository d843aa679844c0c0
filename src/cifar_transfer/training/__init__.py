"""Stage 3, training: the two phases (`loop.fit`), checkpoints and resume, several processes under
torchrun, and a run folder's training files (`trainer.train_to_folder`)."""
