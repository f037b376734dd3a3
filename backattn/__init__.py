"""backattn: trainable backward-attention heads on a frozen Transformers causal LM.

Importing the package registers the GPT-2 and Llama families with ``AutoConfig`` and ``AutoModelForCausalLM``; the
family of any other causal-LM architecture is made and registered the first time ``family_for`` (or
``backward_attention_class``) is asked for it (``modeling_auto.py``).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_backattn import (
    DEFAULT_PRESET,
    PRESETS,
    BackwardAttentionConfig,
    GPT2BackwardAttentionConfig,
    LlamaBackwardAttentionConfig,
)
from .heads import BackwardAttentionHeads
from .modeling_auto import FAMILIES, backward_attention_class, family_for
from .modeling_backattn import BackwardAttentionHead, BackwardAttentionLayer
from .modeling_families import GPT2BackwardAttentionForCausalLM, LlamaBackwardAttentionForCausalLM

__version__ = "0.1.0"

for _config_class, _model_class in (
    (GPT2BackwardAttentionConfig, GPT2BackwardAttentionForCausalLM),
    (LlamaBackwardAttentionConfig, LlamaBackwardAttentionForCausalLM),
):
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForCausalLM.register(_config_class, _model_class, exist_ok=True)

__all__ = [
    "DEFAULT_PRESET",
    "FAMILIES",
    "PRESETS",
    "BackwardAttentionConfig",
    "BackwardAttentionHead",
    "BackwardAttentionHeads",
    "BackwardAttentionLayer",
    "GPT2BackwardAttentionConfig",
    "GPT2BackwardAttentionForCausalLM",
    "LlamaBackwardAttentionConfig",
    "LlamaBackwardAttentionForCausalLM",
    "__version__",
    "backward_attention_class",
    "family_for",
]
