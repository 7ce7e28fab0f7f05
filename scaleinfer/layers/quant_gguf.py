"""quantization="gguf": each linear holds its weight as the GGUF file stores it, where a kernel exists for that type.

The parallel linears are built in the int4 scheme of the file's Q4 blocks (groups of 32, the embedding and LM
head as int8 rows); once the model is built, `layer_schemes` names the linears whose GGUF tensors are of another
type (or, fused, of types that are not all kept) and layers/linear.py's choose_layer_schemes re-makes their
weights in the run dtype, before anything loads. The file yields the kept linears' weights as int4 rows and
dequantizes the rest (weights/gguf_quant.py's LinearPlan says which).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from scaleinfer.layers.linear import UNQUANTIZED, Unquantized
from scaleinfer.layers.quant_int4 import Int4Scheme
from scaleinfer.weights.gguf_quant import BLOCK

if TYPE_CHECKING:
    from scaleinfer.weights.gguf import GGUFQuant


class GGUFScheme(Int4Scheme):
    """The model-level scheme of quantization="gguf": int4 in groups of 32 as built, the run dtype where the file's
    tensors are not kept."""

    name = "gguf"

    def __init__(self, source: GGUFQuant, lm_head_int8: bool) -> None:
        super().__init__(group_size=BLOCK, lm_head_int8=lm_head_int8)
        self.source = source

    def layer_schemes(self, model: nn.Module) -> dict[str, Unquantized]:
        """{module name: scheme} of the linears that do not keep the file's blocks (for choose_layer_schemes)."""
        plan = self.source.plan(model.stacked_params)
        return dict.fromkeys(plan.dense, UNQUANTIZED)
