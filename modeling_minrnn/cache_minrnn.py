"""The recurrent state as a transformers `Cache`: roll back (speculative decoding), fork, save and load.

A minGRU/minLSTM block's whole past is its conv window (the last `conv_kernel` inputs) and its state `h`. The plain
`DynamicCache(config=...)` holds them in `LinearAttentionLayer`s, which cannot be cropped once a recurrent state is
in them. `MinRNNCache` holds them in `MinRNNCacheLayer`s, which, while transformers has switched on past recording
(`activate_past_recording`, done by assisted decoding), also keep the states `h_t` after each token of the last
forwards and the conv inputs, so `crop(-n)` restores the exact state of `n` tokens earlier without recomputing.
"""

import hashlib
import json
import os

import torch
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionLayer


STATE_FORMAT = "minrnn-state"
STATE_FORMAT_VERSION = "1"
# The model settings a state depends on, checked in this order when a state is loaded.
IDENTITY_FIELDS = ("cell_type", "num_hidden_layers", "hidden_size", "recurrent_size", "conv_kernel")


class MinRNNCacheLayer(LinearAttentionLayer):
    """One block's conv window `(batch, hidden, conv_kernel)` and state `h` `(batch, recurrent)`, with a rollback
    record while past recording is on: the states before and after each of the last `max_rollback` tokens
    (`past_states`, `(batch, n + 1, recurrent)`) and the conv inputs of those tokens (kept in `conv_states`)."""

    # It counts tokens in Python and grows its record by concatenation: a dynamic cache, not a static-address one.
    is_compileable = False

    def __init__(self, max_rollback: int, **kwargs):
        super().__init__(**kwargs)
        self.max_rollback = max_rollback
        self.seen_tokens = 0
        self.past_states = None

    @classmethod
    def holding(cls, h, conv, conv_kernel: int, seen_tokens: int, max_rollback: int) -> "MinRNNCacheLayer":
        """A layer already holding state `h` `(batch, recurrent)` and conv window `conv` `(batch, hidden, kernel)`."""
        layer = cls(max_rollback=max_rollback)
        layer.lazy_initialization(conv_states=conv, recurrent_states=h, conv_kernel_size=conv_kernel or None)
        if conv is not None:
            layer.conv_states[0].copy_(conv)
        layer.recurrent_states[0].copy_(h)
        layer.has_previous_state[0] = True
        layer.seen_tokens = seen_tokens
        return layer

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.past_states = None

    @property
    def is_croppable(self) -> bool:
        return self.record_past

    def get_seq_length(self) -> int:
        """Tokens consumed so far (padding included, as for a KV cache)."""
        return self.seen_tokens

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        full = super().update_conv_state(conv_states, state_idx, **kwargs)
        if self.record_past:
            # transformers keeps every recorded input; a rollback never needs more than `max_rollback` of them.
            keep = self.conv_kernel_size[state_idx] + self.max_rollback
            if self.conv_states[state_idx].shape[-1] > keep:
                self.conv_states[state_idx] = self.conv_states[state_idx][..., -keep:].clone()
        return full

    def update_recurrent_state(
        self, recurrent_states: torch.Tensor, state_idx: int = 0, all_states: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """`recurrent_states` `(batch, recurrent)`: the state after the new tokens; `all_states`
        `(batch, seq, recurrent)`: the state after each of them (required: it also counts the tokens)."""
        if all_states is None:
            raise ValueError("`MinRNNCacheLayer.update_recurrent_state` needs `all_states` (batch, seq, recurrent).")
        if self.record_past:
            if self.past_states is None:
                before = (
                    self.recurrent_states[state_idx]
                    if self.is_recurrent_states_initialized[state_idx]
                    else torch.zeros_like(recurrent_states)
                )
                self.past_states = before.unsqueeze(1)
            past = torch.cat([self.past_states, all_states.to(self.past_states.dtype)], dim=1)
            # A clone, so that a long prefill's full `(batch, seq, recurrent)` tensor is not kept alive by a view.
            keep = self.max_rollback + 1
            self.past_states = past[:, -keep:].clone() if past.shape[1] > keep else past
        self.seen_tokens += all_states.shape[1]
        return super().update_recurrent_state(recurrent_states, state_idx)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (a negative int, as for transformers' dynamic layers) and drop
        the rollback record; `crop(0)` only drops the record."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"`crop` takes a negative number of tokens to remove; got {tokens_to_remove}. "
                f"Use `crop(-n)` to forget the last n tokens."
            )
        n = -tokens_to_remove
        if n > 0:
            recorded = 0 if self.past_states is None else self.past_states.shape[1] - 1
            if not self.record_past or n > recorded:
                raise ValueError(
                    f"`crop({tokens_to_remove})` needs the state {n} tokens back, but this layer recorded only "
                    f"the last {recorded} (record_past={self.record_past}, max_rollback={self.max_rollback}). Call "
                    "`cache.activate_past_recording()` before the forward, or create `MinRNNCache(config, "
                    "max_rollback=...)` with a larger window."
                )
            self.recurrent_states[0].copy_(self.past_states[:, -1 - n])
            self.seen_tokens -= n
        self.past_states = None
        if self.is_conv_states_initialized[0]:
            kernel = self.conv_kernel_size[0]
            end = self.conv_states[0].shape[-1] - n
            window = self.conv_states[0][..., max(end - kernel, 0) : end]
            # A window shorter than the kernel (fewer tokens seen) is the sequence start: zeros, as the conv pads.
            self.conv_states[0] = torch.nn.functional.pad(window, (kernel - window.shape[-1], 0)).contiguous()

    def _map_rows(self, fn) -> None:
        for i in range(self.number_of_states):
            if self.is_conv_states_initialized[i]:
                self.conv_states[i] = fn(self.conv_states[i])
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = fn(self.recurrent_states[i])
        if self.past_states is not None:
            self.past_states = fn(self.past_states)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])


class MinRNNCache(DynamicCache):
    """A `DynamicCache` of `MinRNNCacheLayer`s: accepted wherever `DynamicCache(config=model.config)` is, and in
    addition it can be cropped after speculative decoding's verify forward, counts the tokens it has consumed
    (`get_seq_length`, used by `generate(prefill_chunk_size=...)`), forks and selects rows, and saves to a file.

    Args:
        config: the model's `MinRNNConfig`.
        max_rollback (`int`): how many tokens back `crop` can go while past recording is on; memory
            `O(max_rollback x recurrent)` per layer and row, and only while recording.
        offloading (`bool`): as for `DynamicCache`.
    """

    def __init__(self, config, max_rollback: int = 256, offloading: bool = False):
        if max_rollback < 1:
            raise ValueError(f"`max_rollback` must be >= 1; got {max_rollback}.")
        self.max_rollback = max_rollback
        layers = [MinRNNCacheLayer(max_rollback=max_rollback) for _ in range(config.num_hidden_layers)]
        Cache.__init__(self, layers=layers, offloading=offloading)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    @classmethod
    def concatenate(cls, caches: list["MinRNNCache"]) -> "MinRNNCache":
        """One batch from the rows of several caches of the same model, in order (e.g. prompts prefilled apart).

        The token count is the longest one's, as if the shorter prompts were left-padded."""
        if not caches or any(not isinstance(c, MinRNNCache) for c in caches):
            raise ValueError("`MinRNNCache.concatenate` takes a non-empty list of `MinRNNCache`s.")
        first = caches[0]
        if len({len(c.layers) for c in caches}) != 1:
            raise ValueError(f"Caches have different numbers of layers: {[len(c.layers) for c in caches]}.")
        out = cls.__new__(cls)
        out.max_rollback = first.max_rollback
        layers = []
        for parts in zip(*(c.layers for c in caches)):
            if any(p.past_states is not None for p in parts):
                raise ValueError("Cannot concatenate caches in the middle of a rollback record: call `crop(0)` first.")
            if not all(p.has_previous_state[0] for p in parts):
                raise ValueError("Every cache must hold a state (run a forward through it) before concatenating.")
            has_conv = parts[0].is_conv_states_initialized[0]
            layers.append(
                MinRNNCacheLayer.holding(
                    h=torch.cat([p.recurrent_states[0] for p in parts]),
                    conv=torch.cat([p.conv_states[0] for p in parts]) if has_conv else None,
                    conv_kernel=parts[0].conv_kernel_size[0] if has_conv else 0,
                    seen_tokens=max(p.seen_tokens for p in parts),
                    max_rollback=first.max_rollback,
                )
            )
        Cache.__init__(out, layers=layers, offloading=first.offloading)
        return out

    def save(self, path: str | os.PathLike, model) -> None:
        """Write every layer's state and conv window to a safetensors file, with what identifies `model`."""
        from safetensors.torch import save_file

        tensors = {}
        for i, layer in enumerate(self.layers):
            if not layer.has_previous_state[0]:
                raise ValueError(f"Layer {i} holds no state yet: run the prompt through the cache before saving it.")
            tensors[f"layers.{i}.h"] = layer.recurrent_states[0].contiguous()
            if layer.is_conv_states_initialized[0]:
                kernel = layer.conv_kernel_size[0]
                window = layer.conv_states[0][..., -kernel:]  # while recording, the window has older inputs before it
                tensors[f"layers.{i}.conv"] = torch.nn.functional.pad(window, (kernel - window.shape[-1], 0)).contiguous()
        metadata = {"format": STATE_FORMAT, "version": STATE_FORMAT_VERSION, **model_identity(model)}
        metadata["seen_tokens"] = f"{self.get_seq_length():020d}"  # fixed width: the file's size never varies
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, model, max_rollback: int = 256) -> "MinRNNCache":
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
        cache = cls(model.config, max_rollback=max_rollback)
        kernel = model.config.conv_kernel
        for i in range(len(cache.layers)):
            h, conv = tensors.get(f"layers.{i}.h"), tensors.get(f"layers.{i}.conv")
            if h is None or (kernel > 0) != (conv is not None):
                raise ValueError(f"{path} lacks the state of layer {i}: the file is incomplete.")
            cache.layers[i] = MinRNNCacheLayer.holding(
                h=h.to(model.device),
                conv=conv.to(model.device) if conv is not None else None,
                conv_kernel=kernel,
                seen_tokens=int(metadata["seen_tokens"]),
                max_rollback=max_rollback,
            )
        return cache


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


__all__ = ["MinRNNCache", "MinRNNCacheLayer"]
