"""Carried-state training (truncated backpropagation through time): contiguous streams and the state they carry.

Training from a zero state teaches a recurrent model nothing beyond `block_size` tokens. Here every training row
reads its own contiguous part of the corpus block after block, and the final state of block k (each layer's `h` and
conv window, detached) is the initial state of block k + 1: the model learns to use a context as long as the
stream, at the memory cost of one block (gradients stop at the block's start).

- `data.TokenStreams`: one token array cut into `num_streams` contiguous parts, read in lockstep, block `i` of every
  part at step `i` (a pure function of the index, so resuming needs only the step counter).
- `CarriedState`: the detached state of every row a process trains, carried from one forward to the next, reset
  where a stream starts over and, with `reset="eos"`, at every EOS token (the EOS starts the next document from a
  zero state, as the prompt `[EOS] + text` does in generation); part of the checkpoint (`state_dict`).

Used by `scripts/pretrain.py` (`--carry-state`) and `benchmarks/context_usage.py`.
"""

from __future__ import annotations

import typing

import torch

from modeling_minrnn.cache_minrnn import LayerState, layer_states

from .config import StateReset

STATE_RESETS = typing.get_args(StateReset)


class CarriedState:
    """The detached final state of `num_rows` training rows, carried into their next block.

    One `LayerState` per layer, each row's `h` and conv window; zeros until a row's first block. `forward` runs a
    group of rows (`rows`, a slice: one micro-step of one process) from their carried state and keeps the state
    after the block; only the block's own forward is in the autograd graph.
    """

    def __init__(self, num_rows: int, reset: StateReset, eos_token_id: int | None = None):
        if reset not in STATE_RESETS:
            raise ValueError(f"state_reset={reset!r} must be one of {STATE_RESETS}")
        if reset == "eos" and eos_token_id is None:
            raise ValueError("state_reset='eos' needs the tokenizer's eos_token_id")
        self.num_rows = num_rows
        self.reset = reset
        self.eos_token_id = eos_token_id
        self.states: list[LayerState] | None = None
        self.next_index = 0  # the block index the next forward reads (checked on resume)

    def _cache(self, model_config, rows: slice, restart: torch.Tensor):
        """A `MinRNNCache` holding the carried state of `rows`; rows where `restart` `(rows,)` is True hold zeros."""
        from modeling_minrnn import MinRNNCache

        if self.states is None:
            return MinRNNCache(model_config)  # nothing carried yet: the model starts from zeros
        keep = ~restart.unsqueeze(-1)
        return MinRNNCache.from_layer_states([
            LayerState(torch.where(keep, h[rows], 0.0),
                       None if conv is None else torch.where(keep.unsqueeze(-1), conv[rows], 0.0))
            for h, conv in self.states
        ])

    def _store(self, rows: slice, cache) -> None:
        block_states = layer_states(cache)
        if self.states is None:
            # Allocated from the first output: the device and dtypes are the model's.
            self.states = [LayerState(h.new_zeros(self.num_rows, *h.shape[1:]),
                                      None if conv is None else conv.new_zeros(self.num_rows, *conv.shape[1:]))
                           for h, conv in block_states]
        for (h, conv), (new_h, new_conv) in zip(self.states, block_states):
            # detach: the next block's gradients stop here (truncated BPTT), and no graph outlives its step.
            h[rows] = new_h.detach()
            if conv is not None:
                conv[rows] = new_conv.detach()

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
        # Plain tuples (not LayerState): `torch.load(weights_only=True)` reads them back.
        states = None if self.states is None else [tuple(state) for state in self.states]
        return {"reset": self.reset, "num_rows": self.num_rows, "next_index": self.next_index, "states": states}

    def load_state_dict(self, state: dict) -> None:
        if (state["reset"], state["num_rows"]) != (self.reset, self.num_rows):
            raise ValueError(
                f"the saved carried state has state_reset={state['reset']!r} and {state['num_rows']} rows; this run "
                f"has state_reset={self.reset!r} and {self.num_rows} rows"
            )
        # Copies: this state is updated in place, block after block.
        self.states = None if state["states"] is None else [
            LayerState(h.clone(), None if conv is None else conv.clone()) for h, conv in state["states"]]
        self.next_index = state["next_index"]
