"""protogmm: prototypical self-supervised learning without partial prototype collapse."""

__version__ = "0.1.0"
