"""Models that implementations are judged against."""

from bcr_verify.models.free_queue import FreeQueue
from bcr_verify.models.reference import BCRCache, ReferenceCache

__all__ = ["BCRCache", "FreeQueue", "ReferenceCache"]
