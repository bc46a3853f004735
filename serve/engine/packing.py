"""Length-sorted batches under a token budget.

Sorting by length keeps padding (wasted compute) small inside a batch; the budget counts the
padded source tokens of every decoder row (beam_size rows per source), so memory stays flat
whether a batch holds many short sentences or a few long ones.
"""

from __future__ import annotations

# The one token budget of a batch, for the engine and the scheduler alike: padded source tokens of
# every decoder row (sources x beam size x longest source).
DEFAULT_MAX_BATCH_TOKENS = 8192


def batch_cost(n_sources: int, longest: int, rows_per_source: int) -> int:
    """Padded tokens of a batch: every row is as long as its longest source."""
    return n_sources * rows_per_source * longest


def pack_by_tokens(lengths: list[int], max_tokens: int, rows_per_source: int = 1,
                   max_sources: int | None = None) -> list[list[int]]:
    """Indices of `lengths` grouped into batches, shortest sources first.

    A batch grows while its padded cost stays within `max_tokens` (and it holds at most
    `max_sources` sources); a single source over the budget still gets a batch of its own.
    Ties in length keep input order, so packing is deterministic.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])  # stable
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending, so source i is the longest of the batch it joins.
        full = max_sources is not None and len(current) >= max_sources
        if current and (full or batch_cost(len(current) + 1, lengths[i], rows_per_source) > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
