"""Exact order-statistic selection: which entries of a tensor a magnitude trim keeps.

Two implementations side by side, one convention (an entry's *stable rank*
orders by value and, among equal values, by flat row-major index; the k
largest keep the lowest indices among ties):

- :mod:`.exact`: in memory, for the reference functions — ``kth_smallest``,
  ``smallest_mask``, ``largest_mask``, ``rank_range_mask``,
  and ``stream_kth_smallest`` (a whole model's order statistic in two
  streaming histogram passes, TIES ``trim_scope: model``);
- :mod:`.stream`: streamed, for kernels — :class:`~.stream.StreamSelector`
  finds the exact k-th smallest ``|delta|`` of a tensor read in pieces
  (usually one counting pass), :class:`~.stream.RankCut` turns it into
  per-block masks, :class:`~.stream.SelectionPasses` is the kernel base
  that wires a selector into the engine's statistic passes;
- :mod:`.counting`: the counting loop behind :mod:`.stream` (compiled, with
  its torch reference ``count_deltas_torch``).

The interface both give a method is the same answer: for series ``i`` and
order statistic ``k``, the value and how many entries are below and equal to
it; tests/test_merge_select.py checks them against ``torch.sort``.
"""
