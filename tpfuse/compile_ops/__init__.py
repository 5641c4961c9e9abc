"""The op contract: schema, fake kernels, autograd, validation, backend dispatch, and the push protocols' host side."""

from .all_gather_hidden import all_gather_hidden
from .linear_all_gather_hidden import linear_all_gather_hidden
from .backend import Backend
from .dispatch import choose_backend
from .validation import SUPPORTED_DTYPES

__all__ = ["all_gather_hidden", "linear_all_gather_hidden", "Backend", "choose_backend", "SUPPORTED_DTYPES"]
