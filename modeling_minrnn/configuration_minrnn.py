"""minRNN configuration: minGRU / minLSTM language models ("Were RNNs All We Needed?", Feng et al. 2024)."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from .cells import CELL_TYPES
from .scan import SCAN_BACKENDS


@strict
class MinRNNConfig(PreTrainedConfig):
    r"""
    Configuration of a minGRU / minLSTM causal language model.

    Each block follows the paper's language model: LayerNorm -> causal depthwise conv (optional) -> minRNN cell in an
    expanded width -> projection back -> residual; LayerNorm -> 2-layer MLP (optional) -> residual.

    Args:
        vocab_size (`int`, defaults to 32000): number of token ids.
        hidden_size (`int`, defaults to 768): width of the residual stream.
        num_hidden_layers (`int`, defaults to 12): number of blocks.
        cell_type (`str`, defaults to `"mingru"`): `"mingru"` or `"minlstm"`.
        expansion_factor (`float`, defaults to 2.0): the recurrent state has `int(expansion_factor * hidden_size)`
            channels.
        conv_kernel (`int`, defaults to 4): width of the causal depthwise convolution before the cell; 0 disables it.
        intermediate_size (`int`, defaults to 3072): hidden width of the MLP; 0 disables the MLP.
        layer_norm_epsilon (`float`, defaults to 1e-5): epsilon of the LayerNorms.
        dropout (`float`, defaults to 0.0): dropout on each residual branch and on the embeddings.
        initializer_range (`float`, defaults to 0.02): std of the normal init of linear and embedding weights.
        scan_backend (`str`, defaults to `"auto"`): how the recurrence is computed over a sequence; `"auto"` picks
            the fastest correct backend for the device (see `modeling_minrnn.scan`).
        fused_linear_cross_entropy (`bool`, defaults to `False`): in training mode with `labels`, compute the loss
            from the last hidden states chunk by chunk (`modeling_minrnn.linear_cross_entropy`) instead of from the
            full `(tokens, vocab)` logits: faster and lighter, but the output's `logits` is then None. Evaluation
            mode, generation and a head other than a plain `nn.Linear` (e.g. LoRA on `lm_head`) keep the logits.
        tie_word_embeddings (`bool`, defaults to `True`): share the input embedding and the output head.
        use_cache (`bool`, defaults to `True`): return the recurrent state so generation can continue from it.

    Example:

    ```python
    >>> from modeling_minrnn import MinRNNConfig, MinRNNForCausalLM
    >>> config = MinRNNConfig(vocab_size=256, hidden_size=256, num_hidden_layers=4, cell_type="minlstm")
    >>> model = MinRNNForCausalLM(config)
    ```"""

    model_type = "minrnn"

    vocab_size: int = 32000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    cell_type: str = "mingru"
    expansion_factor: float | int = 2.0
    conv_kernel: int = 4
    intermediate_size: int = 3072
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0
    initializer_range: float = 0.02
    scan_backend: str = "auto"
    fused_linear_cross_entropy: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = True

    @property
    def layer_types(self):
        # One LinearAttentionLayer per block in `DynamicCache(config=...)`: conv window + recurrent state.
        return ["linear_attention"] * self.num_hidden_layers

    @property
    def recurrent_size(self) -> int:
        """Channels of the recurrent state `h` in each block."""
        return int(self.expansion_factor * self.hidden_size)

    def validate_architecture(self):
        """Reject values that would build a broken model, naming the field and what is valid."""
        super().validate_architecture()
        for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"`{name}` must be a positive integer; got {value}.")
        for name in ("conv_kernel", "intermediate_size"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"`{name}` must be >= 0 (0 disables it); got {value}.")
        if self.cell_type not in CELL_TYPES:
            raise ValueError(f"`cell_type` must be one of {CELL_TYPES}; got {self.cell_type!r}.")
        if self.scan_backend not in SCAN_BACKENDS:
            raise ValueError(f"`scan_backend` must be one of {SCAN_BACKENDS}; got {self.scan_backend!r}.")
        if self.expansion_factor <= 0 or self.recurrent_size < 1:
            raise ValueError(
                f"`expansion_factor` must be > 0 and give at least one recurrent channel "
                f"(int(expansion_factor * hidden_size) >= 1); got {self.expansion_factor}."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1); got {self.dropout}.")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"`layer_norm_epsilon` must be > 0; got {self.layer_norm_epsilon}.")
        if self.initializer_range <= 0:
            raise ValueError(f"`initializer_range` must be > 0; got {self.initializer_range}.")


__all__ = ["MinRNNConfig"]
