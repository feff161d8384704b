"""Carried-state training (truncated backpropagation through time): contiguous streams and the state they carry.

Training from a zero state teaches a recurrent model nothing beyond `block_size` tokens. Here every training row
reads its own contiguous part of the corpus block after block, and the final state of block k (each layer's `h` and
conv window, detached) is the initial state of block k + 1: the model learns to use a context as long as the
stream, at the memory cost of one block (gradients stop at the block's start).

- `TokenStreams`: one token array cut into `num_streams` contiguous parts, read in lockstep, block `i` of every
  part at step `i` (a pure function of the index, so resuming needs only the step counter).
- `CarriedState`: the detached state of every row a process trains, carried from one forward to the next, reset
  where a stream starts over and, with `reset="eos"`, at every EOS token (the EOS starts the next document from a
  zero state, as the prompt `[EOS] + text` does in generation); part of the checkpoint (`state_dict`).

Used by `scripts/pretrain.py` (`--carry-state`) and `benchmarks/context_usage.py`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

STATE_RESETS = ("eos", "none")


class TokenStreams:
    """`tokens` `(n,)` cut into `num_streams` contiguous parts of `n // num_streams` tokens (the rest unused).

    Block `i` of stream `s` holds inputs `tokens[start : start + block_size]` and targets one token later, with
    `start = s * part + (i % blocks_per_epoch) * block_size`: consecutive blocks continue each other, and every
    token of a part is predicted once per epoch. Epoch `e = i // blocks_per_epoch` starts the parts over.
    """

    def __init__(self, tokens: np.ndarray, num_streams: int, block_size: int):
        self.tokens = tokens
        self.num_streams = num_streams
        self.block_size = block_size
        self.part = len(tokens) // num_streams
        # One extra token: the last block's last target.
        self.blocks_per_epoch = (self.part - 1) // block_size
        if self.blocks_per_epoch < 1:
            raise ValueError(
                f"carried state: {len(tokens)} training tokens cut into {num_streams} streams (batch_size x "
                f"processes x gradient_accumulation_steps) leave {self.part} tokens per stream, fewer than "
                f"block_size + 1 = {block_size + 1}; use fewer rows, a smaller block_size or more data"
            )

    def starts_epoch(self, index: int) -> bool:
        """Whether block `index` is the first of an epoch (every stream starts over: no state to carry in)."""
        return index % self.blocks_per_epoch == 0

    def block(self, index: int, streams: range) -> tuple[np.ndarray, np.ndarray]:
        """Block `index` of `streams`: `(inputs, targets)`, each int64 `(len(streams), block_size)`."""
        offset = (index % self.blocks_per_epoch) * self.block_size
        starts = np.asarray(streams) * self.part + offset
        window = self.tokens[starts[:, None] + np.arange(self.block_size + 1)]
        return window[:, :-1], window[:, 1:]


class CarriedState:
    """The detached final state of `num_rows` training rows, carried into their next block.

    Each layer's `h` `(num_rows, recurrent)` and conv window `(num_rows, hidden, conv_kernel)`; zeros until a row's
    first block. `forward` runs a group of rows (`rows`, a slice: one micro-step of one process) from their carried
    state and keeps the state after the block; only the block's own forward is in the autograd graph.
    """

    def __init__(self, num_rows: int, reset: Literal["eos", "none"], eos_token_id: int | None = None):
        if reset not in STATE_RESETS:
            raise ValueError(f"state_reset={reset!r} must be one of {STATE_RESETS}")
        if reset == "eos" and eos_token_id is None:
            raise ValueError("state_reset='eos' needs the tokenizer's eos_token_id")
        self.num_rows = num_rows
        self.reset = reset
        self.eos_token_id = eos_token_id
        self.h: list[torch.Tensor] | None = None
        self.conv: list[torch.Tensor | None] | None = None
        self.next_index = 0  # the block index the next forward reads (checked on resume)

    def _cache(self, model_config, rows: slice, restart: torch.Tensor):
        """A `MinRNNCache` holding the carried state of `rows`; rows where `restart` `(rows,)` is True hold zeros."""
        from modeling_minrnn import MinRNNCache

        if self.h is None:
            return MinRNNCache(model_config)  # nothing carried yet: the model starts from zeros
        keep = ~restart.unsqueeze(-1)
        states = [torch.where(keep, h[rows], 0.0) for h in self.h]
        convs = None if self.conv[0] is None else [torch.where(keep.unsqueeze(-1), c[rows], 0.0) for c in self.conv]
        return MinRNNCache.from_states(states, convs)

    def _store(self, rows: slice, cache) -> None:
        from modeling_minrnn.cache_minrnn import cache_states

        states, convs = cache_states(cache)
        if self.h is None:
            # Allocated from the first output: the device and dtypes are the model's.
            self.h = [h.new_zeros(self.num_rows, *h.shape[1:]) for h in states]
            self.conv = [None] * len(states) if convs is None else [c.new_zeros(self.num_rows, *c.shape[1:])
                                                                       for c in convs]
        for i, h in enumerate(states):
            # detach: the next block's gradients stop here (truncated BPTT), and no graph outlives its step.
            self.h[i][rows] = h.detach()
            if convs is not None:
                self.conv[i][rows] = convs[i].detach()

    def forward(self, model, inputs: torch.Tensor, targets: torch.Tensor, rows: slice, index: int, fresh: bool):
        """The model's output (`.loss` over every target) for block `index` of `rows`, `inputs`/`targets`
        `(len(rows), block)`, starting from their carried state (zeros where `fresh`: a stream starts over)."""
        config = getattr(model, "module", model).config  # DDP / FSDP wrappers keep the model in `.module`
        kwargs = {}
        restart = torch.full((inputs.shape[0],), fresh, dtype=torch.bool, device=inputs.device)
        if self.reset == "eos":
            is_eos = inputs == self.eos_token_id
            # Each EOS starts a sequence: seq_idx changes there, so state and conv window restart at it. A row's
            # first token is never a start for the model (it continues the given state), hence `restart`.
            kwargs["seq_idx"] = is_eos.cumsum(dim=1)
            restart = restart | is_eos[:, 0]
        cache = self._cache(config, rows, restart)
        # `labels` only switch the loss on; the targets are `shift_labels`, so the block's last input is scored too.
        out = model(input_ids=inputs, labels=inputs, shift_labels=targets.contiguous(), cache=cache, use_cache=True,
                    **kwargs)
        self._store(rows, cache)  # updated in place by the forward
        out.cache = None  # the caller holds the loss; the state lives on here, detached
        self.next_index = index + 1
        return out

    def state_dict(self) -> dict:
        return {"reset": self.reset, "num_rows": self.num_rows, "next_index": self.next_index, "h": self.h,
                "conv": self.conv}

    def load_state_dict(self, state: dict) -> None:
        if (state["reset"], state["num_rows"]) != (self.reset, self.num_rows):
            raise ValueError(
                f"the saved carried state has state_reset={state['reset']!r} and {state['num_rows']} rows; this run "
                f"has state_reset={self.reset!r} and {self.num_rows} rows"
            )
        # Copies: this state is updated in place, block after block.
        self.h = None if state["h"] is None else [h.clone() for h in state["h"]]
        self.conv = None if state["conv"] is None else [c.clone() if c is not None else None for c in state["conv"]]
        self.next_index = state["next_index"]
