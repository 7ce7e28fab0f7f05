"""quantization="gguf": each linear holds its weight as the GGUF file stores it, where a kernel exists for that type.

The parallel linears are built in the int4 scheme of the file's Q4 blocks (groups of 32, the embedding and LM
head as int8 rows); once the model is built, `layer_schemes` names the linears whose GGUF tensors are Q8_0 (the
group-wise int8 scheme, layers/quant_int8_groups.py, where its Triton GEMV runs: a model built on a GPU;
Q8_0_DEVICES) or of a type without a kernel here (or, fused, of types
that do not go to one scheme: the run dtype), and layers/linear.py's choose_layer_schemes re-makes their weights
so, before anything loads. The file yields the kept linears' weights as int4 / int8 rows and dequantizes the
rest (weights/gguf_quant.py's LinearPlan says which).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from scaleinfer.kernels.dispatch import HAS_TRITON
from scaleinfer.layers.linear import UNQUANTIZED
from scaleinfer.layers.quant_int4 import Int4Scheme
from scaleinfer.layers.quant_int8_groups import Int8GroupScheme
from scaleinfer.weights.gguf_quant import BLOCK, DENSE

if TYPE_CHECKING:
    from scaleinfer.weights.gguf import GGUFQuant

# Where Q8_0 linears stay int8: the devices its Triton GEMV serves. On the CPU the only path is the dequantized
# matmul, 3.5-20x slower than float32's on 2 threads (N x K 3072 x 576 to 4096 x 4096), so Q8_0 is dequantized there
# (the tests add "cpu" to run the kept path, which a GPU takes past the GEMV's rows).
Q8_0_DEVICES = ("cuda",)


class GGUFScheme(Int4Scheme):
    """The model-level scheme of quantization="gguf": int4 in groups of 32 as built; int8 in groups of 32 where the
    file's tensors are Q8_0, the run dtype where they are not kept."""

    name = "gguf"

    def __init__(self, source: GGUFQuant, lm_head_int8: bool) -> None:
        super().__init__(group_size=BLOCK, lm_head_int8=lm_head_int8)
        self.source = source
        self.others = {"int8": Int8GroupScheme(BLOCK), DENSE: UNQUANTIZED}  # the linears not int4

    def layer_schemes(self, model: nn.Module) -> dict[str, object]:
        """{module name: scheme} of the linears that are not int4 (for choose_layer_schemes)."""
        device = torch.get_default_device()  # the model is built on its device (a context around this call)
        plan = self.source.plan(model.stacked_params, keep_q8_0=HAS_TRITON and device.type in Q8_0_DEVICES)
        return {module: self.others[kind] for module, kind in plan.schemes.items() if kind != "int4"}
