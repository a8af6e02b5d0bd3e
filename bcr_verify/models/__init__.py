"""Models that implementations are judged against."""

from bcr_verify.models.reference import BCRCache, ReferenceCache

__all__ = ["BCRCache", "ReferenceCache"]
