"""The op contract: schema, fake kernels, autograd, backend dispatch, workspace."""

from .all_gather_hidden import all_gather_hidden
from .linear_all_gather_hidden import linear_all_gather_hidden
from .dispatch import SUPPORTED_DTYPES, Backend, choose_backend

__all__ = ["all_gather_hidden", "linear_all_gather_hidden", "Backend", "choose_backend", "SUPPORTED_DTYPES"]
