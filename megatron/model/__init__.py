"""The GPT-NeoX model as a list of layers (gpt.py), its layers (transformer.py; Llama-family
models are the same layer with other parts, named in layer_types.py), its loss (loss.py) and
sizing (sizing.py)."""

from megatron.model.gpt import GPTModel, LayerDef, count_parameters, layer_defs
from megatron.model.loss import lm_loss

__all__ = ["GPTModel", "LayerDef", "count_parameters", "layer_defs", "lm_loss"]
