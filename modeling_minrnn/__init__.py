"""minrnn: minGRU / minLSTM language models as transformers models: a causal LM and sequence / token classifiers.

Importing the package registers model_type "minrnn" with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM`,
`AutoModelForSequenceClassification` and `AutoModelForTokenClassification`, and marks the classes for remote code, so
`save_pretrained` writes the code files and an `auto_map` that `from_pretrained(..., trust_remote_code=True)` loads
where this package is not installed.
"""

# First: transformers imports torchao whenever it is installed, and torchao's import-time lines are filtered here.
from . import dependency_noise  # noqa: F401  # isort: skip
import transformers
from transformers import AutoConfig

from .cache_minrnn import MinRNNCache
from .configuration_minrnn import MinRNNConfig
from .modeling_minrnn import (
    AUTO_CLASSES,
    MinRNNForCausalLM,
    MinRNNForSequenceClassification,
    MinRNNForTokenClassification,
    MinRNNModel,
    MinRNNPreTrainedModel,
)
from .packing import check_input_values
from .scan import SCAN_BACKENDS, linear_recurrence

__version__ = "0.2.0"

AutoConfig.register(MinRNNConfig.model_type, MinRNNConfig, exist_ok=True)
MinRNNConfig.register_for_auto_class()
for _auto_class, _model_class in AUTO_CLASSES.items():
    getattr(transformers, _auto_class).register(MinRNNConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class)

__all__ = [
    "MinRNNCache",
    "MinRNNConfig",
    "MinRNNForCausalLM",
    "MinRNNForSequenceClassification",
    "MinRNNForTokenClassification",
    "MinRNNModel",
    "MinRNNPreTrainedModel",
    "SCAN_BACKENDS",
    "check_input_values",
    "linear_recurrence",
]
