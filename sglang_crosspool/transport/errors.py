"""Errors of the weights-pool links (importable without ZeroMQ or torch.distributed)."""


class FFNServerError(RuntimeError):
    """An FFN server died or failed a request; in-flight requests cannot complete."""
