"""The recurrent state as a transformers `Cache`, plus what transformers' own cache lacks: fork, select, save, load.

A minGRU/minLSTM block's whole past is its conv window (the last `conv_kernel` inputs) and its state `h`. The config
declares one `"linear_attention"` layer per block, so transformers' own `DynamicCache(config=...)` holds them in
`LinearAttentionLayer`s, which also count the tokens consumed (`get_seq_length`) and, once past recording is on
(`activate_past_recording`, switched on by assisted and prompt-lookup decoding), keep the states a `crop` rolls back
to. `forward` and `generate()` use that plain cache. `MinRNNCache` is that same `DynamicCache` plus row operations
(`batch_repeat_interleave`, `batch_select_indices`), concatenation and state files.

Everything here goes through the `Cache`'s public methods (`get_conv_state`, `get_recurrent_state`,
`update_conv_state`, `update_recurrent_state`, `has_previous_state`, `reorder_cache`, `crop`); `_layer_internals` is
the one place that reads or writes a layer's fields, for the three things transformers 5.25 has no method for.
"""

import hashlib
import json
import os
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicCache

from .configuration_minrnn import MinRNNConfig

STATE_FORMAT = "minrnn-state"
STATE_FORMAT_VERSION = "1"
# The model settings a state depends on, checked in this order when a state is loaded.
IDENTITY_FIELDS = ("cell_type", "num_hidden_layers", "hidden_size", "recurrent_size", "conv_kernel")


class _LayerInternals(NamedTuple):
    conv_kernel: int  # the conv window's width, what `crop(0)` trims a recording window back to
    recorded: int  # the states recorded since the last `crop`, i.e. how far back `crop` can go


def _layer_internals(cache: Cache, layer_idx: int, token_count: int | None = None) -> _LayerInternals:
    """The one adapter to fields of transformers' `LinearAttentionLayer` (5.25), for the API it lacks:

    - no getter for the conv kernel size a layer was initialised with (`conv_kernel_size`): a window recorded for
      rollback is wider, and a snapshot keeps only the last `conv_kernel` inputs;
    - no getter for the number of recorded states (`recurrent_states_history`): `crop` beyond it fails inside
      transformers with an IndexError instead of saying what is missing;
    - no setter for the token count `get_seq_length` reports (`cumulative_length_linear`; `increase_count` adds one
      per call): a cache rebuilt from a snapshot (state file, concatenation) reports the tokens it has consumed.
    """
    layer = cache.layers[layer_idx]
    if token_count is not None:
        layer.cumulative_length_linear.fill_(token_count)
    recorded = len(layer.recurrent_states_history[0]) if cache.is_recording_past(layer_idx) else 0
    return _LayerInternals(layer.conv_kernel_size[0], recorded)


def register_tokens(cache: Cache, layer_idx: int, inputs: torch.Tensor, conv_kernel: int) -> torch.Tensor:
    """Hand one block's new inputs `(batch, hidden, seq)` to the cache's conv window; returns the cached window
    followed by them. A block without a conv still passes a zero-channel window `(batch, 0, seq)`: transformers counts
    a layer's tokens (`get_seq_length`) and marks it as holding a state only in `update_conv_state`."""
    if conv_kernel == 0:
        inputs = inputs[:, :0]
    return cache.update_conv_state(inputs, layer_idx, conv_kernel_size=max(conv_kernel, 1))


def forget_before(cache: Cache, layer_idx: int, newest: torch.Tensor) -> None:
    """Keep only the `newest` `(batch, 1)` inputs of each row's cached conv window, the rest as the zeros a sequence
    starts from: a packed sequence that started `newest` tokens ago continues in the next call, the ones before it
    must not reach it. Edits the window `get_conv_state` returns in place, as transformers' own fused conv updates
    (`causal_conv1d_update`) do."""
    window = cache.get_conv_state(layer_idx)
    age = torch.arange(window.shape[-1] - 1, -1, -1, device=window.device)  # 0 = the newest input
    window.masked_fill_((age >= newest).unsqueeze(1), 0.0)


class MinRNNCache(DynamicCache):
    """`DynamicCache(config=config)` (one `LinearAttentionLayer` per block), accepted wherever that is; in addition it
    forks and selects rows, concatenates caches, and saves to / loads from a state file.

    Args:
        config: the model's `MinRNNConfig`.
        offloading (`bool`): as for `DynamicCache`.
    """

    def __init__(self, config, offloading: bool = False):
        super().__init__(config=config, offloading=offloading)

    def _rows(self) -> int:
        state = self.get_recurrent_state(0) if self.has_previous_state(0) else None
        if state is None:
            raise ValueError("The cache holds no state yet: run a prompt through it before forking or selecting rows.")
        if any(self.is_recording_past(i) for i in range(len(self.layers))):
            raise ValueError(
                "The cache is recording states for rollback (assisted decoding); call `cache.crop(0)` to end the "
                "recording before forking or selecting rows."
            )
        return state.shape[0]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Fork each row's state into `repeats` consecutive rows (e.g. several continuations of one prompt)."""
        self.reorder_cache(torch.arange(self._rows()).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows `indices` (integer indices or a bool mask), in that order."""
        rows = torch.arange(self._rows())[torch.as_tensor(indices, device="cpu")]
        self.reorder_cache(rows)

    def crop(self, tokens_to_remove: int) -> None:
        """`Cache.crop`, saying what is missing instead of failing inside transformers: a negative number of tokens,
        at most as many as recorded since `activate_past_recording` (or the last crop)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"`crop` takes a negative number of tokens to remove; got {tokens_to_remove}. Use `crop(-n)` to forget "
                "the last n tokens."
            )
        for i in range(len(self.layers)):
            recorded = _layer_internals(self, i).recorded
            if -tokens_to_remove > recorded:
                raise ValueError(
                    f"`crop({tokens_to_remove})` needs the state {-tokens_to_remove} tokens back, but this cache "
                    f"recorded only the last {recorded} (recording: {self.is_recording_past(i)}). Call "
                    "`cache.activate_past_recording()` before the forwards you may want to undo."
                )
        super().crop(tokens_to_remove)

    @classmethod
    def from_layer_states(cls, states: list["LayerState"], seen_tokens: int = 0) -> "MinRNNCache":
        """A cache holding one `LayerState` per block (what `layer_states` returns); `seen_tokens` is what
        `get_seq_length()` then reports."""
        cache = cls(MinRNNConfig(num_hidden_layers=len(states)))
        for i, (h, conv) in enumerate(states):
            window = conv if conv is not None else h.new_zeros(h.shape[0], 0, 1)
            register_tokens(cache, i, window, 0 if conv is None else conv.shape[-1])
            cache.update_recurrent_state(h, i)
            _layer_internals(cache, i, token_count=seen_tokens)
        return cache

    @classmethod
    def from_cache(cls, cache: Cache) -> "MinRNNCache":
        """The state of any cache a model has run through (e.g. the plain `DynamicCache` `generate()` returns)."""
        return cls.from_layer_states(layer_states(cache), int(cache.get_seq_length()))

    @classmethod
    def concatenate(cls, caches: list[Cache]) -> "MinRNNCache":
        """One batch from the rows of several caches of the same model, in order (e.g. prompts prefilled apart).

        The token count is the longest one's, as if the shorter prompts were left-padded."""
        if not caches:
            raise ValueError("`MinRNNCache.concatenate` takes a non-empty list of caches.")
        parts = [layer_states(cache) for cache in caches]
        if len({len(p) for p in parts}) != 1 or len({p[0].conv is None for p in parts}) != 1:
            raise ValueError("`MinRNNCache.concatenate` takes caches of one model (same layers, same conv).")
        states = [
            LayerState(
                torch.cat([s.h for s in layer]),
                None if layer[0].conv is None else torch.cat([s.conv for s in layer]),
            )
            for layer in zip(*parts)
        ]
        return cls.from_layer_states(states, max(int(c.get_seq_length()) for c in caches))

    def save(self, path: str | os.PathLike, model) -> None:
        """Write every block's state and conv window to a safetensors file, with what identifies `model`."""
        save_state(self, path, model)

    @classmethod
    def load(cls, path: str | os.PathLike, model) -> "MinRNNCache":
        """Read a state written by `save` for `model`; raises, naming the file or the mismatched field, if it is not
        a minrnn state file or was saved from a model with other settings or weights."""
        from safetensors import safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as err:  # safetensors raises its own error types for truncated or foreign files
            raise ValueError(f"{path} is not a readable minrnn state file: {err}") from err
        if metadata.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not a minrnn state file (no format={STATE_FORMAT!r} in its metadata).")
        expected = model_identity(model)
        for field in (*IDENTITY_FIELDS, "dtype", "weights_fingerprint"):
            if metadata.get(field) != expected[field]:
                raise ValueError(
                    f"{path} holds a state of a model with {field}={metadata.get(field)}, but this model has "
                    f"{field}={expected[field]}: a state only fits the model that computed it."
                )
        config = model.config
        layers = range(config.num_hidden_layers)
        if any(f"layers.{i}.h" not in tensors or (config.conv_kernel > 0) != (f"layers.{i}.conv" in tensors)
               for i in layers):
            raise ValueError(f"{path} lacks the state of a layer: the file is incomplete.")
        states = [
            LayerState(tensors[f"layers.{i}.h"].to(model.device),
                       tensors[f"layers.{i}.conv"].to(model.device) if config.conv_kernel else None)
            for i in layers
        ]
        return cls.from_layer_states(states, int(metadata["seen_tokens"]))


class LayerState(NamedTuple):
    """One block's whole past: its state `h` `(batch, recurrent)` and its conv window of the last `conv_kernel`
    inputs `(batch, hidden, conv_kernel)` (None without a conv). The one snapshot type: state files, carried-state
    training and chunked backward read and write it."""

    h: torch.Tensor
    conv: torch.Tensor | None


def layer_states(cache: Cache) -> list[LayerState]:
    """Every block's `LayerState` in any cache a model has run through (a `DynamicCache(config=...)` or a
    `MinRNNCache`), as views: the cache overwrites them in place on its next forward."""
    layers = range(len(getattr(cache, "layers", [])))
    if not layers or not all(cache.is_linear) or not all(cache.has_previous_state(i) for i in layers):
        raise ValueError(
            "The cache holds no state for some block: run the prompt through it first (`model(ids, cache=cache)`)."
        )
    states = []
    for i in layers:
        window = cache.get_conv_state(i)
        if window.shape[1] == 0:  # the zero-channel window of a model without a conv
            window = None
        else:  # while past recording is on, older inputs come before the window
            kernel = _layer_internals(cache, i).conv_kernel
            window = window[..., -kernel:]
            window = torch.nn.functional.pad(window, (kernel - window.shape[-1], 0))
        states.append(LayerState(cache.get_recurrent_state(i), window))
    return states


def save_state(cache: Cache, path: str | os.PathLike, model) -> None:
    """Write `cache`'s state (any cache of `model`) to a safetensors file, with what identifies `model`."""
    from safetensors.torch import save_file

    tensors = {}
    for i, (h, conv) in enumerate(layer_states(cache)):
        tensors[f"layers.{i}.h"] = h.contiguous()
        if conv is not None:
            tensors[f"layers.{i}.conv"] = conv.contiguous()
    metadata = {"format": STATE_FORMAT, "version": STATE_FORMAT_VERSION, **model_identity(model)}
    metadata["seen_tokens"] = f"{int(cache.get_seq_length()):020d}"  # fixed width: the file's size never varies
    save_file(tensors, os.fspath(path), metadata=metadata)


def model_identity(model) -> dict[str, str]:
    """What a saved state must match: the settings it depends on, the dtype and a fingerprint of the weights."""
    config = model.config
    identity = {field: str(getattr(config, field)) for field in IDENTITY_FIELDS}
    identity["dtype"] = str(model.dtype).removeprefix("torch.")
    identity["weights_fingerprint"] = weights_fingerprint(model)
    return identity


def weights_fingerprint(model, samples_per_tensor: int = 1024) -> str:
    """sha256 over every parameter's name, shape and `samples_per_tensor` evenly strided values: cheap even for a
    large model, and any retraining or fine-tuning changes it."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].float().cpu()
        digest.update(json.dumps([name, list(param.shape)]).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


__all__ = ["LayerState", "MinRNNCache", "layer_states", "save_state"]
