"""trainguard: protects shared PyTorch training clusters from sabotage and silent corruption.

Importing this package never imports torch, numpy or any framework; each room imports
what it needs only when it is used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
