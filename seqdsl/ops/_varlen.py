"""Variable-length (packed) sequences, shared by every core.

fla convention: ``cu_seqlens`` is a LongTensor ``[N + 1]`` of cumulative lengths, the batch size is
1 and the N sequences are packed along time: ``x [1, sum(lengths), ...]``. States reset at every
sequence start; ``initial_state`` and the final state carry a leading ``N`` dim.

Strategy: unpack into a right-padded batch ``[N, max_len, ...]``, run the batched core once, and
pack the outputs back. Padding goes at the *end* of each sequence and uses values that leave the
state unchanged (zero keys/inputs/betas, log decay 0, multiplier 1), so the padded final state is
the sequence's final state, and causality keeps padding out of the real outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

Tensor = torch.Tensor


class _Layout:
    """Index maps between the packed ``[1, total]`` and padded ``[N, max_len]`` layouts."""

    def __init__(self, cu_seqlens: Tensor, total: int, device: torch.device):
        cu = [int(c) for c in cu_seqlens.tolist()]
        if len(cu) < 2 or cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to the packed length {total}, got {cu}")
        lengths = torch.tensor([b - a for a, b in zip(cu, cu[1:])], device=device)
        self.num_seqs = len(cu) - 1
        self.max_len = max(int(lengths.max()), 1)
        starts = torch.tensor(cu[:-1], device=device)
        # seq[p], pos[p]: which sequence packed position p belongs to, and where inside it
        self.seq = torch.repeat_interleave(torch.arange(self.num_seqs, device=device), lengths)
        self.pos = torch.arange(total, device=device) - starts[self.seq]

    def pad(self, x: Tensor, value: float) -> Tensor:
        """[1, total, *rest] -> [N, max_len, *rest]."""
        out = x.new_full((self.num_seqs, self.max_len, *x.shape[2:]), value)
        return out.index_put((self.seq, self.pos), x[0])

    def unpad(self, x: Tensor) -> Tensor:
        """[N, max_len, *rest] -> [1, total, *rest]."""
        return x[self.seq, self.pos].unsqueeze(0)


def varlen_call(core: Callable, cu_seqlens: Tensor, sequences: Mapping[str, Tensor | None],
                pad_values: Mapping[str, float] | None = None, **kwargs):
    """Run ``core(**padded sequences, **kwargs)`` over packed sequences.

    ``sequences`` maps argument names to packed ``[1, total, ...]`` tensors (or None);
    ``pad_values`` gives the state-preserving padding value per name (default 0).
    ``kwargs`` (``initial_state [N, ...]`` among them) pass through unchanged.
    The core returns ``o`` or ``(o, final_state)``; ``o`` is packed back to ``[1, total, ...]``.
    """
    pad_values = pad_values or {}
    present = [x for x in sequences.values() if x is not None]
    if any(x.shape[0] != 1 for x in present):
        raise ValueError("with cu_seqlens the batch size must be 1 (sequences packed along time)")
    layout = _Layout(cu_seqlens, present[0].shape[1], present[0].device)
    state = kwargs.get("initial_state")
    if state is not None and state.shape[0] != layout.num_seqs:
        raise ValueError(f"initial_state has {state.shape[0]} rows for {layout.num_seqs} sequences")
    padded = {name: None if x is None else layout.pad(x, pad_values.get(name, 0.0))
              for name, x in sequences.items()}
    result = core(**padded, **kwargs)
    if isinstance(result, tuple):
        return (layout.unpad(result[0]), *result[1:])
    return layout.unpad(result)
