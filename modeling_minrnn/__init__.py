"""minrnn: minGRU / minLSTM causal language models as transformers models.

Importing the package registers model_type "minrnn" with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`, and
marks the classes for remote code, so `save_pretrained` writes the code files and an `auto_map` that
`from_pretrained(..., trust_remote_code=True)` loads where this package is not installed.
"""

# First: transformers imports torchao whenever it is installed, and torchao's import-time lines are filtered here.
from . import dependency_noise  # noqa: F401  # isort: skip
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_minrnn import MinRNNCache
from .configuration_minrnn import MinRNNConfig
from .modeling_minrnn import MinRNNForCausalLM, MinRNNModel, MinRNNPreTrainedModel
from .scan import SCAN_BACKENDS, linear_recurrence

__version__ = "0.2.0"

AutoConfig.register(MinRNNConfig.model_type, MinRNNConfig, exist_ok=True)
AutoModel.register(MinRNNConfig, MinRNNModel, exist_ok=True)
AutoModelForCausalLM.register(MinRNNConfig, MinRNNForCausalLM, exist_ok=True)
MinRNNConfig.register_for_auto_class()
MinRNNModel.register_for_auto_class("AutoModel")
MinRNNForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "MinRNNCache",
    "MinRNNConfig",
    "MinRNNForCausalLM",
    "MinRNNModel",
    "MinRNNPreTrainedModel",
    "SCAN_BACKENDS",
    "linear_recurrence",
]
