"""The order in which a lazy-eviction cache hands out pages, so the model can predict it.

A lazy cache (vLLM's ``BlockPool``) never evicts on demand: every page no request holds sits
in one free queue, cached or not, and an allocation takes the queue's head, evicting the
block cached on each page it takes. So *which* blocks an allocation evicts is decided by the
queue's order, and that order is the cache's LRU policy:

* pages start in id order, ``1..capacity``;
* a released page that holds no cached block goes to the front (reused first: it costs no
  cache hit), a released cached page to the back (reused last, in release order, so the
  least recently released block is evicted first);
* a hit on a cached page no request holds takes it out of the queue wherever it is; where a
  lookup counts as a use, a lookup moves its pages to the back;
* uncaching a page (an explicit eviction, a flush) leaves it where it is.

The machine checks every allocation against :meth:`take`, and the cache's own free count
against ``len()``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable


class FreeQueue:
    def __init__(self, capacity: int):
        self._order: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, capacity + 1))

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, page: int) -> bool:
        return page in self._order

    def head(self, n: int) -> list[int]:
        """The ``n`` pages an allocation of ``n`` must take (fewer if the queue is shorter)."""
        return [page for page, _ in zip(self._order, range(n))]

    def take(self, n: int) -> list[int]:
        taken = self.head(n)
        for page in taken:
            del self._order[page]
        return taken

    def remove(self, pages: Iterable[int]) -> None:
        """A request hit these pages: they leave the queue."""
        for page in pages:
            del self._order[page]

    def refresh(self, pages: Iterable[int]) -> None:
        """A lookup refreshed these pages (caches whose recency is ``"use"``): to the back."""
        for page in pages:
            if page in self._order:
                self._order.move_to_end(page)

    def release(self, uncached: list[int], cached: list[int]) -> None:
        """Pages one request released, each list in release order."""
        for page in reversed(uncached):
            self._order[page] = None
            self._order.move_to_end(page, last=False)
        for page in cached:
            self._order[page] = None

    def pages(self) -> list[int]:
        return list(self._order)
