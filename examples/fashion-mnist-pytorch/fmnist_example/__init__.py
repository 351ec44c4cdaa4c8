"""fmnist_example: a Flower / PyTorch app on Fashion-MNIST, compressed by fedge."""
