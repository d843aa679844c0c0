"""Fine-tune an ImageNet ResNet-50 on CIFAR-10 in two phases and explain its mistakes."""
