"""Build a model whose decoder layers live in a store (host memory or NVMe files) and stream to the device.

The model is constructed with its parameters on the meta device (no memory anywhere), then the resident
parts (embeddings, final norm, LM head) are given device memory and each layer's parameters become views of
that layer's loading buffer when its first tensor arrives, so the checkpoint loads straight into the store.
Once a layer has all its tensors the store keeps it (with a shard, this process's share) and drops the buffer,
so a sharded process never holds the whole model. The model file is the same one every other path uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from scaleinfer.config import ModelConfig, OffloadConfig
from scaleinfer.errors import InvalidRequestError, UnsupportedArchitectureError
from scaleinfer.layers.linear import choose_layer_schemes, linear_scheme, quantization_scheme
from scaleinfer.models.registry import model_class
from scaleinfer.models.weights import _default_loader
from scaleinfer.offload.host_store import HostStore
from scaleinfer.offload.layout import LayerLayout, bind, layer_params
from scaleinfer.offload.nvme_store import NVMeStore
from scaleinfer.offload.shard import Shard, current_shard
from scaleinfer.offload.streamer import LayerStreamer
from scaleinfer.weights.dummy import init_dummy_weights
from scaleinfer.weights.source import ModelSource
from scaleinfer.worker.device import default_dtype

DEFAULT_NUM_SLOTS = 2  # one layer computing, one arriving


def build_offloaded_model(
    source: ModelSource,
    config: ModelConfig,
    offload: OffloadConfig,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
) -> tuple[nn.Module, LayerStreamer]:
    # A quantized layer streams its int8 levels (parameters, packed like any other); its scales are buffers and
    # stay resident.
    scheme = quantization_scheme(config.quantization, source.quant)
    with default_dtype(dtype), torch.device(device), parameters_on_meta(), linear_scheme(scheme):
        model = model_class(source.arch)(source.arch)
        choose_layer_schemes(model, scheme)
    layers = _decoder_layers(model)
    shard = current_shard()
    layouts = [LayerLayout.of(layer, shard.world_size if shard else 1) for layer in layers]
    num_slots = num_slots_for(offload.offload_gpu_budget, layouts)
    store = _make_store(offload, layouts, pin=device.type == "cuda", shard=shard)
    streamed = {id(p): _placeholder(p) for layer in layers for p in layer.parameters()}
    materialize(model, {id(p): torch.empty_like(p, device=device) for p in model.parameters() if id(p) not in streamed})
    materialize(model, streamed)
    if config.load_format == "dummy":
        _init_dummy(model, layers, layouts, store, device, config.seed)
    else:
        with LayerLoading(layers, layouts, store):
            model.load_weights(source.iter_weights(dtype, progress=progress))
    streamer = LayerStreamer(layers, layouts, store, device, num_slots)  # rebinds the layers to device slots
    store.finish_loading()
    return model, streamer


def num_slots_for(budget: int | None, layouts: list[LayerLayout]) -> int:
    """How many layers the device budget holds at once; a budget below one layer is an error."""
    layer_bytes = max(layout.nbytes for layout in layouts)
    if budget is None:
        return DEFAULT_NUM_SLOTS
    if budget < layer_bytes:
        raise InvalidRequestError(
            f"offload_gpu_budget={budget} bytes holds no layer: one decoder layer takes "
            f"{layer_bytes} bytes ({layer_bytes / 2**20:.1f} MiB)"
        )
    return budget // layer_bytes


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters registered inside are moved to the meta device as they are registered (attributes such as
    weight_loader kept, ties kept); buffers (rotary tables) stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            param = meta
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def materialize(module: nn.Module, tensors: dict[int, torch.Tensor]) -> None:
    """Replace the parameters whose id is in `tensors` by real ones over those tensors, everywhere they are
    registered (tied weights stay tied), keeping their attributes."""
    made: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None or id(param) not in tensors:
                continue
            if id(param) not in made:
                made[id(param)] = nn.Parameter(tensors[id(param)], requires_grad=False)
                made[id(param)].__dict__.update(param.__dict__)
            sub._parameters[name] = made[id(param)]


class LayerLoading:
    """While a checkpoint loads (a context): each layer parameter's weight_loader is wrapped so that a layer
    is bound to its loading buffer at its first tensor, and handed to store.complete_layer (buffer freed,
    parameters back on placeholders) once every parameter has received its elements.

    Completion is read from what the parameters receive, not from checkpoint names, so renamed families
    (GPT-2, GPT-NeoX, OPT), fused tensors split by hf_weights (Phi-3 qkv_proj, gate_up_proj), separate q/k/v
    stacked into one parameter, GGUF names and skipped tensors (rotary inv_freq) need nothing special. A
    tensor arriving after its layer looked complete (a duplicate, or a loader that narrows what it receives)
    reopens the layer with its kept share restored: the order of the checkpoint changes only how many
    buffers are alive at once, never the result."""

    def __init__(self, layers: nn.ModuleList, layouts: list[LayerLayout], store: HostStore | NVMeStore) -> None:
        self.layouts, self.store = layouts, store
        self.params = [layer_params(layer, layout) for layer, layout in zip(layers, layouts)]
        # [layer][param]: shard_id -> elements received; a repeated shard_id counts once
        self.received: list[list[dict[tuple, int]]] = [[{} for _ in layout.params] for layout in layouts]
        self.bound: set[int] = set()  # layers whose parameters are views of their loading buffer
        self.loaders: dict[int, Callable | None] = {}  # id(param) -> its own weight_loader (None: the default)

    def __enter__(self) -> LayerLoading:
        for index, params in enumerate(self.params):
            for position, param in enumerate(params):
                own = self.loaders[id(param)] = getattr(param, "weight_loader", None)
                # load_into's own fallback for parameters without a loader: the same checks, the same copy
                param.weight_loader = self._loader(index, position, own or _default_loader)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for param in (param for params in self.params for param in params):
            own = self.loaders[id(param)]
            if own is None:
                del param.weight_loader
            else:
                param.weight_loader = own

    def _loader(self, index: int, position: int, load: Callable) -> Callable:
        def load_and_track(param: nn.Parameter, loaded: torch.Tensor, *shard_id: object) -> None:
            self._open(index)
            load(param, loaded, *shard_id)
            self.received[index][position][shard_id] = loaded.numel()
            if self._complete(index):
                self._close(index)

        return load_and_track

    def _complete(self, index: int) -> bool:
        pairs = zip(self.received[index], self.layouts[index].params)
        return all(sum(got.values()) >= math.prod(param.shape) for got, param in pairs)

    def _open(self, index: int) -> None:
        if index not in self.bound:
            bind(self.params[index], self.layouts[index], self.store.layer_buffer(index))
            self.bound.add(index)

    def _close(self, index: int) -> None:
        self.store.complete_layer(index)
        for param in self.params[index]:
            param.data = _placeholder(param)  # drops the last reference to the loading buffer
        self.bound.discard(index)


def _placeholder(param: nn.Parameter) -> torch.Tensor:
    """A host tensor of the parameter's shape and dtype over one element: no memory until the layer loads.
    Writing into it fails (every element is the same memory), so nothing can land there by mistake."""
    return torch.empty((), dtype=param.dtype, device="cpu").expand(param.shape)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no model.layers stack to stream")
    return layers


def _make_store(
    offload: OffloadConfig, layouts: list[LayerLayout], pin: bool, shard: Shard | None
) -> HostStore | NVMeStore:
    if offload.offload == "nvme":
        return NVMeStore(layouts, offload.offload_path, offload.offload_num_readers, shard)
    return HostStore(layouts, pin, shard)


@torch.no_grad()
def _init_dummy(
    model: nn.Module,
    layers: nn.ModuleList,
    layouts: list[LayerLayout],
    store: HostStore | NVMeStore,
    device: torch.device,
    seed: int,
) -> None:
    """Random weights drawn on the device a layer at a time, then written to the store."""
    init_dummy_weights(model, seed, exclude=layers)
    scratch = torch.empty(max(layout.nbytes for layout in layouts), dtype=torch.uint8, device=device)
    for index, (layer, layout) in enumerate(zip(layers, layouts)):
        bind(layer_params(layer, layout), layout, scratch)
        init_dummy_weights(layer, seed + 1 + index)  # the same seed on every rank: the same layer
        store.write_layer(index, scratch)
