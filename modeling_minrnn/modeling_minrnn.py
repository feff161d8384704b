"""minGRU / minLSTM causal language models ("Were RNNs All We Needed?", Feng et al. 2024, arXiv:2410.01201).

Reading order: mixer (conv + cell + projection) -> block -> pretrained base -> model -> heads (causal LM, sequence
and token classification).
The recurrence lives in `scan.py`, the cells' gates in `cells.py`; this file wires them into blocks and a model.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import TransformersKwargs, can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .cache_minrnn import forget_before, register_tokens
from .cells import CELLS
from .configuration_minrnn import MinRNNConfig
from .linear_cross_entropy import linear_cross_entropy
from .packing import check_mask_values, checks_values, padding_mask_from, sequence_starts
from .scan import cell_recurrence

logger = logging.get_logger(__name__)


class MinRNNMixer(nn.Module):
    """Causal depthwise conv (optional) -> minGRU/minLSTM cell at `recurrent_size` width -> projection back (if any).

    With a cache, the conv window and the recurrent state `h` live in the block's cache layer (transformers'
    `LinearAttentionLayer`), so a forward over new tokens continues exactly where the cached one stopped. While the
    cache records the past (assisted decoding), it also receives the state after every token, to roll back to.
    """

    def __init__(self, config: MinRNNConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.recurrent_size = config.recurrent_size
        self.conv_kernel = config.conv_kernel
        self.scan_backend = config.scan_backend
        self.cell_type = config.cell_type
        cell = CELLS[config.cell_type]
        self.n_gates = cell.projections
        if self.conv_kernel > 0:
            self.conv1d = nn.Conv1d(
                self.hidden_size, self.hidden_size, self.conv_kernel, groups=self.hidden_size,
                padding=self.conv_kernel - 1,
            )
        self.in_proj = nn.Linear(self.hidden_size, self.n_gates * self.recurrent_size, bias=False)
        if self.recurrent_size != self.hidden_size:
            self.out_proj = nn.Linear(self.recurrent_size, self.hidden_size, bias=False)
            self.out_proj.is_residual_output = True
        else:
            # As in the paper: without expansion the cell's state is the output, with no projection back.
            self.out_proj = nn.Identity()

    def causal_conv(self, x: torch.Tensor, cache: Cache | None, reset: torch.Tensor | None = None) -> torch.Tensor:
        """`(batch, seq, hidden) -> (batch, seq, hidden)`, prepending the cached window of earlier inputs.

        `reset` `(batch, seq)` bool marks sequence starts: a tap that would read a token before the start of its
        own sequence reads zero, as if the sequence ran alone.
        """
        seq_len = x.shape[1]
        x = x.transpose(1, 2)
        if reset is not None:
            # Distance of each token from its sequence's start (>= conv_kernel before the first start, where the
            # whole window, cached inputs included, belongs to the sequence carried in).
            time = torch.arange(seq_len, device=x.device)
            since_start = time - torch.where(reset, time, -self.conv_kernel).cummax(dim=1).values
        if cache is not None:
            # The cached window followed by the new inputs (or these alone on the first call).
            window = register_tokens(cache, self.layer_idx, x, self.conv_kernel)
            if reset is None:
                x = window
            else:
                x = window.clone()  # while recording, the cache keeps this very tensor, edited next
                # The kept window continues the row's last sequence: the inputs before its start stay out of it.
                last_start = torch.where(reset, time, -1).amax(dim=1, keepdim=True)
                forget_before(cache, self.layer_idx, torch.where(last_start >= 0, seq_len - last_start, x.shape[-1]))
        total = x.shape[-1]
        if seq_len == 1 and total >= self.conv_kernel and reset is None:
            # One decoding step is a dot product over the window, tap by tap: a conv1d call costs ~5x more at batch
            # 1, and elementwise multiply-adds stay inside an exported graph's fast kernels (XNNPACK), a sum does not.
            weight = self.conv1d.weight.squeeze(1)  # (hidden, conv_kernel)
            out = self.conv1d.bias.unsqueeze(-1)
            for tap in range(self.conv_kernel):  # (batch, hidden, 1) slices: a select, too, leaves XNNPACK's graph
                start = total - self.conv_kernel + tap
                out = torch.addcmul(out, x[..., start : start + 1], weight[:, tap : tap + 1])
            return out.transpose(1, 2)
        # Tap by tap (conv_kernel is small), in the (batch, time, hidden) layout where each tap is contiguous: no
        # transposed copies in and out of a conv1d (whose depthwise backward alone took ~7% of a bf16 training step
        # on a CPU), and one fused kernel under torch.compile. With `reset`, the tap `lag` steps back counts only
        # within the same sequence.
        x = F.pad(x.transpose(1, 2), (0, 0, max(0, self.conv_kernel - 1 + seq_len - total), 0))
        total = x.shape[1]
        weight = self.conv1d.weight.squeeze(1).t()  # (conv_kernel, hidden); the last tap is the current token
        out = self.conv1d.bias
        for lag in range(self.conv_kernel):
            tap = x[:, total - seq_len - lag : total - lag]
            if lag > 0 and reset is not None:
                tap = tap.masked_fill((lag > since_start).unsqueeze(-1), 0.0)
            out = torch.addcmul(out, tap, weight[self.conv_kernel - 1 - lag])
        return out

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        reset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`hidden_states` `(batch, seq, hidden)`; `padding_mask` `(batch, seq)` bool, True = real token; `reset`
        `(batch, seq)` bool, True where a new sequence starts (state and conv window restart there)."""
        initial_state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        if initial_state is not None and torch.is_grad_enabled():
            # The cache overwrites its state in place after the scan (transformers keeps a static address), but the
            # scan's backward still needs the state it started from: training through a cache (carried state).
            initial_state = initial_state.clone()
        if padding_mask is not None:
            # Select, never multiply: NaN or inf at a padded position times 0 is NaN, and would reach the state.
            hidden_states = hidden_states.masked_fill(~padding_mask.unsqueeze(-1), 0.0)
        if self.conv_kernel > 0:
            x = self.causal_conv(hidden_states, cache, reset)
        else:
            x = hidden_states
            if cache is not None:
                register_tokens(cache, self.layer_idx, hidden_states.transpose(1, 2), 0)

        states = cell_recurrence(
            self.cell_type, self.in_proj(x), padding_mask, initial_state, reset, backend=self.scan_backend
        )

        if cache is not None:
            # While recording (assisted decoding), the state after every token, so `crop` can go back to any of them:
            # the scan computed them all anyway. Otherwise only the last one.
            recording = cache.is_recording_past(self.layer_idx) and states.shape[1] > 1
            cache.update_recurrent_state(list(states.unbind(1)) if recording else states[:, -1], self.layer_idx)
        return self.out_proj(states.to(hidden_states.dtype))


class MinRNNMLP(nn.Module):
    def __init__(self, config: MinRNNConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.down_proj.is_residual_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class MinRNNBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: `x + mixer(norm(x))`, then `x + mlp(norm(x))` when the MLP is enabled."""

    def __init__(self, config: MinRNNConfig, layer_idx: int):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = MinRNNMixer(config, layer_idx)
        if config.intermediate_size > 0:
            self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
            self.mlp = MinRNNMLP(config)
        else:
            self.mlp_norm = self.mlp = None
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        reset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.dropout(self.mixer(self.norm(hidden_states), padding_mask, cache, reset))
        if self.mlp is not None:
            hidden_states = hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))
        return hidden_states


class MinRNNPreTrainedModel(PreTrainedModel):
    config: MinRNNConfig
    base_model_prefix = "model"
    _no_split_modules = ["MinRNNBlock"]
    _input_embed_layer = "embeddings"  # found by transformers' `get_input_embeddings` on the model and every head
    supports_gradient_checkpointing = True
    # transformers' output recording: `output_hidden_states` collects each block's input and the final output.
    _can_record_outputs = {"hidden_states": MinRNNBlock}

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Every class of the family in the saved `auto_map`, whichever one is saved: with only the remote code, a
        # causal LM checkpoint then loads as a classifier too (`AutoModelForSequenceClassification`, ...).
        if self._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)
        # transformers initialises leaf modules last (and skips modules without parameters of their own), so the
        # special cases are recognised on the leaves themselves.
        if isinstance(module, nn.Conv1d):
            # The short causal conv starts as the identity (all weight on the current token) and learns to mix in
            # the previous ones: a random init scrambles each token with its neighbours, and the tiny recipe then
            # stayed near the unigram loss for longer (eval after 150 steps: 5.26 here against 5.66 with kaiming).
            identity = torch.zeros_like(module.weight)
            identity[..., -1] = 1.0
            init.copy_(module.weight, identity)  # on the whole parameter, so loaded weights are never overwritten
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and getattr(module, "is_residual_output", False):
            # GPT-2's scheme: residual-branch outputs scaled by 1/sqrt(2 * layers) keep the stream's variance flat.
            std = self.config.initializer_range / (2 * self.config.num_hidden_layers) ** 0.5
            init.normal_(module.weight, mean=0.0, std=std)


def _check_token_range(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.numel() == 0:
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"`input_ids` must be in [0, vocab_size={vocab_size}); got values in [{low}, {high}]. Check that the "
            "tokenizer matches the model (or resize the embeddings)."
        )


def _check_cache(cache: Cache, config: MinRNNConfig, batch_size: int):
    linear = getattr(cache, "is_linear", [])
    if len(linear) < config.num_hidden_layers or not all(linear[: config.num_hidden_layers]):
        raise ValueError(
            "`cache` must hold one linear-attention layer per block: create it with `MinRNNCache(model.config)` "
            "(or `DynamicCache(config=model.config)`) or take the `cache` returned by a previous forward/generate."
        )
    state = cache.get_recurrent_state(0)
    if state is not None and state.shape[0] != batch_size:
        raise ValueError(
            f"`cache` holds states for batch size {state.shape[0]} but the input has batch size {batch_size}; to "
            f"run several rows from one state (e.g. `num_return_sequences`), fork it with "
            f"`cache.batch_repeat_interleave(n)` first."
        )


def _continuation_mask(prompt: torch.Tensor, cache: Cache, attention_mask: torch.Tensor | None):
    """The attention mask that makes `generate` read `prompt` by the rule in `MinRNNForCausalLM.generate`."""
    if not any(getattr(cache, "is_linear", [])[:1]) or not cache.has_previous_state(0):
        return attention_mask  # an empty cache: the prompt is the whole sequence
    seen, length = int(cache.get_seq_length()), prompt.shape[1]
    if attention_mask is not None and attention_mask.shape[1] != length:
        if attention_mask.shape[1] != seen + length:
            raise ValueError(
                f"`attention_mask` has {attention_mask.shape[1]} columns, but the cache has consumed {seen} tokens and "
                f"`input_ids` has {length}: pass a mask of {length} columns (for `input_ids` alone) or of "
                f"{seen + length} (the consumed tokens too)."
            )
        return attention_mask
    if length > seen:
        return attention_mask  # the whole sequence: transformers skips the consumed tokens
    # Only new tokens: a mask over the consumed ones too is how transformers is told not to cut the input.
    new = attention_mask if attention_mask is not None else torch.ones_like(prompt)
    return torch.cat([new.new_ones(prompt.shape[0], seen), new], dim=1)


class MinRNNModel(MinRNNPreTrainedModel):
    def __init__(self, config: MinRNNConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([MinRNNBlock(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.norm_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch, seq)`): token ids; give these or `inputs_embeds`.
        attention_mask (`(batch, seq)`): 1 for real tokens, 0 for padding (or bool); padding leaves the state
            untouched, whatever its embeddings hold.
        inputs_embeds (`(batch, seq, hidden)`): embeddings to use instead of `input_ids`.
        cache (`Cache`): the recurrent state of earlier tokens (a `MinRNNCache(config)`, a
            `DynamicCache(config=...)` or one returned by an earlier call); updated in place with the state after
            these tokens. `past_key_values` and `cache_params` are deprecated aliases.
        use_cache (`bool`): create a cache when none is given, and return it.
        kwargs (transformers' `TransformersKwargs`): `output_hidden_states` returns the input of every block and the
            final output (recorded by transformers' `capture_outputs`); `return_dict=False` returns a tuple.
            Packed sequences (`DataCollatorWithFlattening`, TRL packing) restart the state and the conv window where
            a new sequence starts, marked by any of `position_ids` (`(batch, seq)` or `(1, seq)`: a 0 after the
            row's first real token; ordinary positions start nothing), `cu_seq_lens_q/k` (cumulative lengths over
            the flattened `(batch * seq)` tokens, with `max_length_q/k`) or `seq_idx` (`(batch, seq)`, the index of
            each token's sequence); whichever are given must agree (see `packing.sequence_starts`).
        """
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds` (got both or neither).")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"`input_ids` must have shape (batch, seq); got {tuple(input_ids.shape)}.")
            if checks_values():
                _check_token_range(input_ids, self.config.vocab_size)
            inputs_embeds = self.embeddings(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"`inputs_embeds` must have shape (batch, seq, hidden_size={self.config.hidden_size}); "
                f"got {tuple(inputs_embeds.shape)}."
            )
        batch_size, seq_len = inputs_embeds.shape[:2]
        if seq_len == 0:
            raise ValueError(
                f"The input has no tokens (shape {(batch_size, 0)}); pass at least one token per row."
            )

        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once(
                "`use_cache=True` is incompatible with gradient checkpointing; using `use_cache=False`."
            )
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None:
            _check_cache(cache, self.config, batch_size)
        has_state = cache is not None and cache.has_previous_state(0)
        padding_mask = padding_mask_from(attention_mask, batch_size, seq_len, has_state)
        if padding_mask is not None:
            # Whatever a padded position's embedding holds (NaN, inf) stays out of every later computation, its
            # gradients included: each block only ever sees zeros there.
            inputs_embeds = inputs_embeds.masked_fill(~padding_mask.unsqueeze(-1), 0.0)
        reset = sequence_starts(batch_size, seq_len, padding_mask, inputs_embeds.device, kwargs)

        hidden_states = self.dropout(inputs_embeds)
        for block in self.layers:
            hidden_states = block(hidden_states, padding_mask, cache, reset)
        hidden_states = self.norm_f(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


class MinRNNForCausalLM(MinRNNPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: MinRNNConfig):
        super().__init__(config)
        self.model = MinRNNModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch, seq)`): targets for the next-token loss; shifted inside the
            model, so `labels = input_ids` works. `-100` is ignored. `num_items_in_batch` (a keyword) normalises
            the loss over gradient-accumulation steps.
        logits_to_keep (`int` or `torch.Tensor`): compute logits only for the last `n` positions (or these indices).

        Other arguments (`output_hidden_states` and the packing inputs among them) as in `MinRNNModel.forward`.
        """
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, cache=cache,
            use_cache=use_cache, return_dict=True, **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        if labels is not None and self._fuses_loss():
            # The loss without the (tokens, vocab) logits: nothing to return as logits.
            loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in kwargs}
            loss = linear_cross_entropy(hidden_states, self.lm_head.weight, labels, **loss_kwargs)
            return CausalLMOutputWithPast(loss=loss, cache=outputs.cache, hidden_states=outputs.hidden_states)

        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )

    def _fuses_loss(self) -> bool:
        # Only a plain linear head: the fused loss reads its weight directly, which would skip an adapter's (LoRA)
        # or a hook's contribution.
        return (
            self.config.fused_linear_cross_entropy and self.training and type(self.lm_head) is nn.Linear
            and self.lm_head.bias is None and not self.lm_head._forward_hooks and not self.lm_head._forward_pre_hooks
        )

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """`GenerationMixin.generate`, with the prompt checked once per call, and one rule for continuing from a
        cache that has consumed `n` tokens (`cache.get_seq_length()`; returned by a forward or `generate`, filled by
        `prefill`, or loaded from a state file):

        - `input_ids` longer than `n` tokens is the whole sequence (transformers' convention): its first `n` tokens
          are the ones the cache consumed, and are skipped;
        - `input_ids` of at most `n` tokens, or with an `attention_mask` longer than it (covering the consumed
          tokens too, transformers' way of saying so), holds only the new tokens.

        So more new tokens than the cache has consumed need `attention_mask` of length `n + len(input_ids)`.
        """
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(prompt, torch.Tensor) and prompt.dim() == 2 and not prompt.is_floating_point():
            if prompt.shape[1] == 0:
                raise ValueError(
                    f"The prompt has no tokens (shape {tuple(prompt.shape)}); pass at least one token per row (e.g. "
                    "the BOS token)."
                )
            # Once per call, not in every decoding step's forward (a host-device sync on an accelerator).
            _check_token_range(prompt, self.config.vocab_size)
            if isinstance(kwargs.get("attention_mask"), torch.Tensor):
                check_mask_values(kwargs["attention_mask"])
            if kwargs.get("cache") is not None:
                kwargs["attention_mask"] = _continuation_mask(prompt, kwargs["cache"], kwargs.get("attention_mask"))
        return super().generate(inputs, *args, **kwargs)

    @torch.no_grad()
    def prefill(
        self, input_ids: torch.LongTensor, chunk_size: int = 65536, cache: Cache | None = None
    ) -> CausalLMOutputWithPast:
        """Run a prompt of any length through the model in chunks, in memory bounded by `chunk_size`.

        The state crosses chunk boundaries in the cache, so the result equals one full forward. Returns the last
        position's logits `(batch, 1, vocab)` and the cache; to generate after it, prefill all but the prompt's last
        token and call `generate(input_ids, cache=out.cache, ...)` (or `generate(input_ids[:, -1:], ...)`: see the
        rule in `generate`).
        """
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be >= 1; got {chunk_size}.")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"`input_ids` must have shape (batch, seq) with at least one token; got {tuple(input_ids.shape)}."
            )
        cache = cache if cache is not None else DynamicCache(config=self.config)
        for chunk in input_ids.split(chunk_size, dim=1):
            out = self(chunk, cache=cache, use_cache=True, logits_to_keep=1)
        return out


class MinRNNForSequenceClassification(MinRNNPreTrainedModel):
    """`num_labels` scores from the final hidden state of each row's last real token, as transformers' decoder
    models classify (`GenericForSequenceClassification`): the state there has read the whole sequence."""

    def __init__(self, config: MinRNNConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MinRNNModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def last_real_token(self, input_ids, attention_mask, batch_size: int, seq_len: int, device) -> torch.Tensor:
        """`(batch,)` index of each row's last real token, left or right padding alike: the last position the
        `attention_mask` marks (its last `seq_len` columns), or else, as transformers does, the last token that is
        not `pad_token_id`; the last position when neither tells padding apart."""
        if attention_mask is not None:
            real = attention_mask[:, attention_mask.shape[1] - seq_len :].to(device).bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids.to(device) != self.config.pad_token_id
        elif batch_size > 1:
            raise ValueError(
                "Rows of a batch may be padded: pass `attention_mask` (or set `config.pad_token_id` and pass "
                "`input_ids`) so that each row is classified at its last real token."
            )
        else:
            return torch.full((batch_size,), seq_len - 1, device=device)
        positions = torch.arange(seq_len, device=device)
        return torch.where(real, positions, 0).amax(dim=1)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        r"""
        labels (`(batch,)`): class indices (`num_labels > 1`, cross-entropy), targets (`num_labels == 1`, mean
            squared error) or `(batch, num_labels)` multi-hot floats (`problem_type="multi_label_classification"`).

        Other arguments (a `cache`, packing inputs...) as in `MinRNNModel.forward`.
        """
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        hidden_states = outputs.last_hidden_state
        batch_size, seq_len = hidden_states.shape[:2]
        last = self.last_real_token(input_ids, attention_mask, batch_size, seq_len, hidden_states.device)
        pooled_logits = self.score(hidden_states[torch.arange(batch_size, device=hidden_states.device), last])

        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=pooled_logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled_logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


class MinRNNForTokenClassification(MinRNNPreTrainedModel):
    """`num_labels` scores for every token, from its final hidden state (which has read the tokens up to it)."""

    def __init__(self, config: MinRNNConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MinRNNModel(config)
        self.dropout = nn.Dropout(config.dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> TokenClassifierOutput:
        r"""
        labels (`(batch, seq)`): each token's class index; `-100` (padding, continuation pieces of a word) is ignored.

        Other arguments as in `MinRNNModel.forward`.
        """
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        logits = self.score(self.dropout(outputs.last_hidden_state))

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, config=self.config, **kwargs)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


# Each class under the Auto class that loads it: registered by the package, written into every checkpoint's
# `auto_map` (as `module.Class`, the form remote code is loaded by).
AUTO_CLASSES = {
    "AutoModel": MinRNNModel,
    "AutoModelForCausalLM": MinRNNForCausalLM,
    "AutoModelForSequenceClassification": MinRNNForSequenceClassification,
    "AutoModelForTokenClassification": MinRNNForTokenClassification,
}
AUTO_MAP = {auto: f"{__name__.rsplit('.', 1)[-1]}.{cls.__name__}" for auto, cls in AUTO_CLASSES.items()}

__all__ = [
    "MinRNNForCausalLM",
    "MinRNNForSequenceClassification",
    "MinRNNForTokenClassification",
    "MinRNNModel",
    "MinRNNPreTrainedModel",
]
