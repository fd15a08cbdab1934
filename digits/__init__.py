"""digits: train, export, prove and serve the PyTorch MNIST guide models."""

__version__ = "0.1.0"
