"""The algorithm family, as pure math on flat tensors (see ``base`` for the protocol)."""

from .base import Algorithm, AlgoState, GradRequest
from .sam import SAM
from .sampa import SAMPa
from .sgd import SGD

ALGORITHMS = {"sgd": SGD, "sam": SAM, "sampa": SAMPa}

__all__ = ["ALGORITHMS", "SAM", "SGD", "AlgoState", "Algorithm", "GradRequest", "SAMPa"]
