"""Which replica a new request goes to: the one holding the longest cached prefix of its prompt, else the least loaded.

SGLang's cache-aware routing, on the prefix cache's block hashes instead of a radix tree of text. Each replica
keeps an approximate record of the prompt blocks routed to it (an LRU as large as its KV cache), so that a burst of
requests sharing a prefix lands together before the first one's prefill has filled the cache; the replica's own
prefix cache is asked too (it may hold blocks the record has forgotten). Affinity yields to balance as in SGLang:
when the replica with the prefix has more than BALANCE_ABS requests over the least loaded one, and more than
BALANCE_REL times as many, the least loaded one gets the request.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

BALANCE_ABS = 32  # SGLang router's balance_abs_threshold
BALANCE_REL = 1.5  # and balance_rel_threshold


class RoutedPrefixes:
    """The prompt-block hashes recently routed to one replica, least recently routed first out."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.hashes: OrderedDict[int, None] = OrderedDict()

    def matched(self, hashes: list[int]) -> int:
        """How many of the leading `hashes` were routed here."""
        n = 0
        while n < len(hashes) and hashes[n] in self.hashes:
            n += 1
        return n

    def record(self, hashes: list[int]) -> None:
        for h in hashes:
            self.hashes[h] = None
            self.hashes.move_to_end(h)
        while len(self.hashes) > self.capacity:
            self.hashes.popitem(last=False)


@dataclass
class Choice:
    index: int  # into the candidates
    by_prefix: bool  # False: the least loaded (no replica holds a block of the prompt, or balance won)
    matched_blocks: int


def choose(loads: list[int], matched: list[int]) -> Choice:
    """Candidates' loads (requests in flight) and prompt blocks each holds -> the one to route to."""
    least = min(range(len(loads)), key=lambda i: loads[i])
    best = max(range(len(loads)), key=lambda i: (matched[i], -loads[i]))
    if matched[best] == 0:
        return Choice(least, False, 0)
    gap = loads[best] - loads[least]
    if gap > BALANCE_ABS and loads[best] > BALANCE_REL * loads[least]:
        return Choice(least, False, matched[least])
    return Choice(best, True, matched[best])
