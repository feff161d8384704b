"""The recurrent state as a transformers `Cache`, plus what transformers' own cache lacks: fork, select, save, load.

A minGRU/minLSTM block's whole past is its conv window (the last `conv_kernel` inputs) and its state `h`. The config
declares one `"linear_attention"` layer per block, so transformers' own `DynamicCache(config=...)` holds them in
`LinearAttentionLayer`s, which also count the tokens consumed (`get_seq_length`) and, once past recording is on
(`activate_past_recording`, switched on by assisted and prompt-lookup decoding), keep the states a `crop` rolls back
to. `forward` and `generate()` use that plain cache. `MinRNNCache` is a `DynamicCache` whose layers add only the row
operations (`batch_repeat_interleave`, `batch_select_indices`) and whose cache adds state files and concatenation.
"""

import hashlib
import json
import os
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionCacheLayerMixin, LinearAttentionLayer

STATE_FORMAT = "minrnn-state"
STATE_FORMAT_VERSION = "1"
# The model settings a state depends on, checked in this order when a state is loaded.
IDENTITY_FIELDS = ("cell_type", "num_hidden_layers", "hidden_size", "recurrent_size", "conv_kernel")


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
    must not reach it."""
    window = cache.layers[layer_idx].conv_states[0]
    age = torch.arange(window.shape[-1] - 1, -1, -1, device=window.device)  # 0 = the newest input
    window.masked_fill_((age >= newest).unsqueeze(1), 0.0)


class MinRNNCacheLayer(LinearAttentionLayer):
    """transformers' `LinearAttentionLayer` with the row operations it lacks (forking a prompt's state for several
    continuations, selecting rows) and a `crop` that says what is missing instead of failing inside transformers."""

    def _map_rows(self, fn) -> None:
        for i in range(self.number_of_states):
            if self.is_conv_states_initialized[i]:
                self.conv_states[i] = fn(self.conv_states[i])
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = fn(self.recurrent_states[i])
            if self.record_past:
                self.recurrent_states_history[i] = [fn(state) for state in self.recurrent_states_history[i]]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(
                f"`crop` takes a negative number of tokens to remove; got {tokens_to_remove}. Use `crop(-n)` to forget "
                "the last n tokens."
            )
        recorded = len(self.recurrent_states_history[0]) if self.record_past else 0
        if -tokens_to_remove > recorded:
            raise ValueError(
                f"`crop({tokens_to_remove})` needs the state {-tokens_to_remove} tokens back, but this layer recorded "
                f"only the last {recorded} (record_past={self.record_past}). Call `cache.activate_past_recording()` "
                "before the forwards you may want to undo."
            )
        super().crop(tokens_to_remove)
        kernel = self.conv_kernel_size[0]
        if self.is_conv_states_initialized[0] and self.conv_states[0].shape[-1] < kernel:
            # Fewer inputs than the kernel seen so far: the missing ones are the sequence start's zeros.
            window = self.conv_states[0]
            self.conv_states[0] = torch.nn.functional.pad(window, (kernel - window.shape[-1], 0))


class MinRNNCache(DynamicCache):
    """A `DynamicCache` of `MinRNNCacheLayer`s: accepted wherever `DynamicCache(config=model.config)` is; in addition
    it forks and selects rows, concatenates caches, and saves to / loads from a state file.

    Args:
        config: the model's `MinRNNConfig`.
        offloading (`bool`): as for `DynamicCache`.
    """

    def __init__(self, config, offloading: bool = False):
        layers = [MinRNNCacheLayer() for _ in range(config.num_hidden_layers)]
        Cache.__init__(self, layers=layers, offloading=offloading)

    @classmethod
    def from_layer_states(cls, states: list["LayerState"], seen_tokens: int = 0) -> "MinRNNCache":
        """A cache holding one `LayerState` per block (what `layer_states` returns); `seen_tokens` is what
        `get_seq_length()` then reports."""
        cache = cls.__new__(cls)
        Cache.__init__(cache, layers=[MinRNNCacheLayer() for _ in states])
        for i, (layer, (h, conv)) in enumerate(zip(cache.layers, states)):
            window = conv if conv is not None else h.new_zeros(h.shape[0], 0, 1)
            register_tokens(cache, i, window, 0 if conv is None else conv.shape[-1])
            layer.update_recurrent_state(h)
            layer.cumulative_length_linear.fill_(seen_tokens)
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
    layers = getattr(cache, "layers", [])
    if not layers or not all(
        isinstance(layer, LinearAttentionCacheLayerMixin) and layer.has_previous_state[0] for layer in layers
    ):
        raise ValueError(
            "The cache holds no state for some block: run the prompt through it first (`model(ids, cache=cache)`)."
        )
    states = []
    for layer in layers:
        window, kernel = layer.conv_states[0], layer.conv_kernel_size[0]
        if window.shape[1] == 0:  # the zero-channel window of a model without a conv
            window = None
        else:  # while past recording is on, older inputs come before the window
            window = window[..., -kernel:]
            window = torch.nn.functional.pad(window, (kernel - window.shape[-1], 0))
        states.append(LayerState(layer.recurrent_states[0], window))
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


__all__ = ["LayerState", "MinRNNCache", "MinRNNCacheLayer", "layer_states", "save_state"]
