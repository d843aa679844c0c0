"""Stage 2, the model: ResNet-50 with pretrained ImageNet weights and a small head, saved and loaded
with its recipe, and batched inference."""
