"""sisray: Learning from Scale-Invariant Examples (LSE) for domain-adaptive segmentation, on Ray."""

__version__ = "0.1.0"
