"""Stage 1, data: CIFAR-10 read safely from its official layouts (or downloaded), split, augmented
as tensor ops, and any image file brought to 32x32 RGB the way CIFAR-10's images were made."""
