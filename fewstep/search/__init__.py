"""Searches that produce sampler artifacts: S^3 solver schedules (``fewstep search``)."""

from .s3_search import SearchResult, SearchSpace, search

__all__ = ["SearchResult", "SearchSpace", "search"]
