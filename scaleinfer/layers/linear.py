"""Linear layers that know their tensor-parallel shard, and hold their weight as a quantization scheme says.

Each parameter carries a `weight_loader(param, loaded_weight, shard_id=None)`: the checkpoint gives the
full HF tensor, the loader narrows it to this rank's rows (the rank's output features, or all of them for a
row-parallel layer, whose columns the scheme narrows) and the scheme stores them at their offset. Fused
layers (QKV, gate/up) take one checkpoint tensor per shard_id and place it at its offset.

A scheme owns the weight's parameters, how rows are stored and the matmul. The parallel linears take the one
set by `linear_scheme(...)` while the model is built (the model files never name it); ReplicatedLinear (a
router, OPT's projections) always stays unquantized. A scheme that chooses per layer (a GGUF file's tensors each
keep their own type) names, once the model is built, the layers that take another scheme (`layer_schemes`), and
`choose_layer_schemes` re-makes their weights in it before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from scaleinfer.errors import ModelLoadError
from scaleinfer.kernels.gemv import linear
from scaleinfer.parallel.comm import tp_all_reduce
from scaleinfer.parallel.state import get_parallel_state

Columns = tuple[int, int] | None  # (start, size) of the input features this rank keeps; None: all of them


class Unquantized:
    """Weights in the run dtype, as the checkpoint gives them."""

    name = None

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)

    def load_rows(self, layer: nn.Module, offset: int, rows: torch.Tensor, columns: Columns,
                  shard_id: object) -> None:
        """rows: [n, full input features] of the checkpoint -> weight rows [offset, offset + n)."""
        _copy_checked(rows_of(layer.weight.data, offset, rows), narrow_columns(rows, columns))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(x, layer.weight, bias)


UNQUANTIZED = Unquantized()
_scheme = UNQUANTIZED


@contextmanager
def linear_scheme(scheme) -> Iterator[None]:
    """The parallel linears built inside the block hold their weights as `scheme` says."""
    global _scheme
    previous, _scheme = _scheme, scheme
    try:
        yield
    finally:
        _scheme = previous


def current_scheme():
    """The scheme set by linear_scheme (UNQUANTIZED outside it): the embedding asks it about its table."""
    return _scheme


def choose_layer_schemes(model: nn.Module, scheme) -> None:
    """Where the model-level `scheme` chooses per layer (`scheme.layer_schemes(model)`: {module name: scheme}), re-make
    those parallel linears' weights in their own scheme. Call it right after building the model, inside the same
    device / dtype contexts, before any weight is loaded."""
    choose = getattr(scheme, "layer_schemes", None)
    if choose is None:
        return
    chosen = choose(model)
    for name, module in model.named_modules():
        if name in chosen and isinstance(module, LinearBase) and chosen[name] is not module.scheme:
            module.use_scheme(chosen[name])


def quantization_scheme(name: str | None, checkpoint=None):
    """The scheme for a ModelConfig.quantization value (validated there), or for a pre-quantized checkpoint's
    quantization_config (weights/quant_config.py), which then decides."""
    if checkpoint is not None:
        return checkpoint.scheme(name)
    if name is None:
        return UNQUANTIZED
    if name == "fp8":
        from scaleinfer.layers.quant_fp8 import Fp8Scheme

        return Fp8Scheme()
    if name == "int4":
        from scaleinfer.layers.quant_int4 import Int4Scheme

        return Int4Scheme()
    if name == "gguf":
        raise ModelLoadError("quantization='gguf' keeps a GGUF file's quantized weights; the model is not a .gguf file")
    from scaleinfer.layers.quant_int8 import Int8Scheme

    return Int8Scheme()


def narrow_columns(rows: torch.Tensor, columns: Columns) -> torch.Tensor:
    return rows if columns is None else rows.narrow(1, *columns)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by tensor_parallel_size={denominator}")
    return numerator // denominator


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, scheme=None) -> None:
        super().__init__()
        state = get_parallel_state()
        self.tp_rank, self.tp_size = state.tp_rank, state.tp_size
        self.input_size = input_size  # this rank's input features (a packed scheme's weight may hold fewer columns)
        self.output_size = output_size  # this rank's output features
        self.scheme = scheme or _scheme
        self._create_weights()
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def _create_weights(self) -> None:
        """The scheme's weight, buffers and attributes; their names are kept so that use_scheme can drop them."""
        before = self._own_names()
        self.scheme.create_weights(self, self.output_size, self.input_size)
        self._scheme_names = self._own_names() - before
        self.weight.weight_loader = self.weight_loader

    def _own_names(self) -> set[str]:
        return set(self.__dict__) | set(self._parameters) | set(self._buffers)

    def use_scheme(self, scheme) -> None:
        """Hold the weight as `scheme` says instead of the scheme it was built with; before any weight is loaded."""
        for name in self._scheme_names:
            delattr(self, name)
        self.scheme = scheme
        self._create_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scheme.apply(self, x, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        self._load(param, 0, loaded, shard_id)

    def _load(self, param: nn.Parameter, offset: int, rows: torch.Tensor, shard_id: object,
              columns: Columns = None) -> None:
        """rows: this rank's rows of a checkpoint weight (or bias), placed at `offset` of the parameter."""
        if param is self.bias:
            _copy_checked(rows_of(param.data, offset, rows), rows)
        elif param is self.weight:
            self.scheme.load_rows(self, offset, rows, columns, shard_id)
        else:  # a scheme's own checkpoint tensor (a scale) in rows of the weight, columns in its own units
            _copy_checked(rows_of(param.data, offset, rows), narrow_columns(rows, columns))


class ReplicatedLinear(LinearBase):
    """The same full weight on every rank, unquantized."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, output_size, bias, scheme=UNQUANTIZED)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: y_rank = x @ W[rank rows].T; no communication."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        tp_size = get_parallel_state().tp_size
        super().__init__(input_size, _divide(output_size, tp_size, "output_size"), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        rows = param.shape[0]
        self._load(param, 0, loaded.narrow(0, self.tp_rank * rows, rows), shard_id)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_proj and up_proj); shard_id is the index."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        assert isinstance(shard_id, int), f"merged linear needs an integer shard_id, got {shard_id!r}"
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        self._load(param, offset, loaded.narrow(0, self.tp_rank * size, size), shard_id)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; heads split across ranks (kv heads replicated if fewer)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        tp_size = get_parallel_state().tp_size
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size, "num_attention_heads")
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // num_kv_heads)
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size, rank = {
            "q": (0, q_size, self.tp_rank),
            "k": (q_size, kv_size, self.tp_rank // self.kv_replicas),
            "v": (q_size + kv_size, kv_size, self.tp_rank // self.kv_replicas),
        }[shard_id]
        self._load(param, offset, loaded.narrow(0, rank * size, size), shard_id)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial sums are all-reduced (bias added once, after)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        tp_size = get_parallel_state().tp_size
        super().__init__(_divide(input_size, tp_size, "input_size"), output_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tp_all_reduce(self.scheme.apply(self, x, None))
        return y if self.bias is None else y + self.bias

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        if param.dim() == 1:  # bias: whole on every rank
            _copy_checked(param.data, loaded)
            return
        # the weight's input features, or a scheme's scale tensor's groups of them
        cols = self.input_size if param is self.weight else param.shape[1]
        if loaded.dim() != 2 or tuple(loaded.shape) != (param.shape[0], cols * self.tp_size):
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter "
                             f"{tuple(param.shape)} at tensor_parallel_size={self.tp_size}")
        # Every output row whole: a quantizing scheme takes each row's scale over all its input features, so
        # the stored values are the same at every tensor-parallel size.
        self._load(param, 0, loaded, shard_id, columns=(self.tp_rank * cols, cols))


@dataclass(slots=True)
class GroupRows:
    """Rows of a weight already in a group-wise scheme's form: levels [n, K] and a scale per group [n, K // group].
    The schemes' row types (Int4Rows, Int8GroupRows) add their own fields, numel and narrow; they stand in for the
    [n, K] tensor in the loaders (shape, dim)."""

    levels: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.levels.shape

    @property
    def group_size(self) -> int:
        return self.levels.shape[1] // self.scale.shape[1]

    def dim(self) -> int:
        return 2


def rows_of(param: torch.Tensor, offset: int, rows: torch.Tensor) -> torch.Tensor:
    """The parameter's rows [offset, offset + len(rows)); a checkpoint tensor that overruns it is named."""
    if offset + rows.shape[0] > param.shape[0]:
        raise ValueError(f"checkpoint tensor of shape {tuple(rows.shape)} does not fit parameter {tuple(param.shape)}")
    return param.narrow(0, offset, rows.shape[0])


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit parameter {tuple(dst.shape)}")
    dst.copy_(src)
