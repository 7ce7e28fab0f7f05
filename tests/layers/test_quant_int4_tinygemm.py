"""On a GPU: int4 layers of a bfloat16 run serve from torch's tinygemm layout (kernels/int4_tinygemm.py), through
tinygemm up to TINYGEMM_MAX_ROWS rows, the Triton GEMM that dequantizes the layout in registers up to
TINYGEMM_GEMM_MAX_ROWS (kernels/gemm_int4_tinygemm.py) and the weight dequantized for cuBLAS past it (kernels/
dequant_int4_tinygemm.py, in slices of rows where the temporary would be large), and equal the float32 reference
of their rows, whatever the rows came from (quantized on load, GGUF's kept rows, AWQ's, GPTQ's act-order); fp16
runs keep the Triton kernels; streamed (view) weights are not repacked; a CUDA graph replays each path; a tiny
Llama in int4 through each path is as close to its float32 logits as through the Triton kernels in bf16."""

import pytest
import torch

from scaleinfer.kernels import dequant_int4_tinygemm
from scaleinfer.kernels.gemv_int4 import int4_linear_ref, pack_int4
from scaleinfer.layers import quant_int4
from scaleinfer.layers.linear import ColumnParallelLinear, RowParallelLinear, linear_scheme
from scaleinfer.layers.quant_int4 import Int4Rows, Int4Scheme, quantize_groups
from scaleinfer.layers.quant_int4_checkpoint import Int4CheckpointScheme
from scaleinfer.worker.device import default_dtype

pytestmark = pytest.mark.gpu
BF16 = dict(atol=2e-2, rtol=2e-2)  # tests/kernels/kernel_helpers.py tolerance(torch.bfloat16)
ROWS = [1, 3, 16, 17, 100, 300]  # tinygemm up to 16 (TINYGEMM_MAX_ROWS), the GEMM up to 32, then dequant + cuBLAS


@pytest.fixture(autouse=True)
def _needs_sm80():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs a CUDA GPU of compute capability 8.0+")


def _build(scheme, cls, *args, dtype=torch.bfloat16, **kwargs):
    with torch.device("cuda"), default_dtype(dtype), linear_scheme(scheme):
        return cls(*args, **kwargs)


def _rows(n, k, group, seed, act_order=False):
    g = torch.Generator().manual_seed(seed)
    g_idx = torch.randperm(k, generator=g) // group if act_order else None
    return Int4Rows(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
                    (torch.rand(n, k // group, generator=g) + 0.5) / (4 * k**0.5),
                    torch.randn(n, k // group, generator=g) / (4 * k**0.5), g_idx)


def _x(m, k, dtype=torch.bfloat16):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device="cuda", dtype=dtype)


def _ref(x, rows: Int4Rows, bias=None):
    scale, zero = rows.scale.cuda(), rows.zero.cuda()
    return int4_linear_ref(x, pack_int4(rows.levels.cuda()), scale, zero, bias)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantized_on_load(m, group):
    layer = _build(Int4Scheme(group_size=group), ColumnParallelLinear, 4096, 1024, bias=True)
    w = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(group)) / 64
    layer.weight_loader(layer.weight, w)
    assert layer.tinygemm is not None
    rows = quantize_groups(w.cuda(), group)  # the loader's own quantization, on the same device
    layer.bias.data = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    x = _x(m, 4096)
    got = layer(x)
    assert got.shape == (m, 1024) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, _ref(x, rows, layer.bias), **BF16)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("scheme,group", [("gguf", 32), ("awq", 64), ("awq", 128), ("gptq", 128)])
def test_kept_rows(m, scheme, group):
    """GGUF's Q4 rows (groups of 32), AWQ / GPTQ rows without act-order, stored as they are; a row-parallel shape
    (K = 14336) too."""
    s = Int4Scheme(group_size=group) if scheme == "gguf" else Int4CheckpointScheme(scheme, group, act_order=False)
    layer = _build(s, RowParallelLinear, 14336, 512)
    rows = _rows(512, 14336, group, seed=m + group)
    layer.weight_loader(layer.weight, rows)
    assert layer.tinygemm is not None
    x = _x(m, 14336)
    torch.testing.assert_close(layer(x), _ref(x, rows), **BF16)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_gptq_act_order_rows(m, group):
    """Features sorted by group at load, activations gathered in that order, then tinygemm: x @ W.T as g_idx
    defines W."""
    layer = _build(Int4CheckpointScheme("gptq", group, act_order=True), ColumnParallelLinear, 1024, 256)
    rows = _rows(256, 1024, group, seed=m * group, act_order=True)
    layer.weight_loader(layer.weight, rows)
    assert layer.tinygemm is not None
    x = _x(m, 1024)
    expected = (x.float() @ rows.dequantize().cuda().T).to(torch.bfloat16)
    torch.testing.assert_close(layer(x), expected, **BF16)


@pytest.mark.parametrize("m", [3, 16, 100, 600])
def test_fp16_runs_keep_the_triton_kernels(m):
    """No tinygemm for fp16: the GEMV, the group-wise GEMM up to 512 rows, the dequantized matmul past it."""
    layer = _build(Int4Scheme(), ColumnParallelLinear, 4096, 1024, dtype=torch.float16)
    rows = _rows(1024, 4096, 128, seed=m)
    layer.weight_loader(layer.weight, rows)
    assert layer.tinygemm is None
    x = _x(m, 4096, torch.float16)
    torch.testing.assert_close(layer(x), _ref(x, rows), atol=2e-2, rtol=2e-2)


def test_a_weight_in_a_shared_buffer_is_not_repacked():
    """Offload binds streamed weights to views of a slot (or of a scratch buffer while they are drawn): such a
    weight keeps our layout, so the streamer's next binding is what the matmul reads."""
    layer = _build(Int4Scheme(), ColumnParallelLinear, 1024, 256)
    buffer = torch.zeros(2 * layer.weight.numel(), dtype=torch.uint8, device="cuda")
    layer.weight.data = buffer[: layer.weight.numel()].view(layer.weight.shape)
    rows = _rows(256, 1024, 128, seed=0)
    layer.weight_loader(layer.weight, rows)
    assert layer.tinygemm is None
    x = _x(2, 1024)
    torch.testing.assert_close(layer(x), _ref(x, rows), **BF16)


def _spy_paths(monkeypatch) -> list[tuple[str, int]]:
    calls = []
    for name in ("tinygemm_mm", "tinygemm_gemm", "dequant_tinygemm_mm"):
        real = getattr(quant_int4, name)
        monkeypatch.setattr(quant_int4, name, lambda x, w, b, real=real, name=name: calls.append((name, len(x)))
                            or real(x, w, b))
    return calls


def _path(m: int) -> str:
    if m <= quant_int4.TINYGEMM_MAX_ROWS:
        return "tinygemm_mm"
    return "tinygemm_gemm" if m <= quant_int4.TINYGEMM_GEMM_MAX_ROWS else "dequant_tinygemm_mm"


@pytest.mark.parametrize("m", [17, 100, 256, 257, 2048])
@pytest.mark.parametrize("n,k,group", [(1024, 4096, 128), (512, 14336, 128), (200, 576, 64)])
def test_past_tinygemm_max_rows_the_gemm_on_its_layout_then_the_dequantized_weight(m, n, k, group, monkeypatch):
    calls = _spy_paths(monkeypatch)
    layer = _build(Int4Scheme(group_size=group), ColumnParallelLinear, k, n, bias=True)
    rows = _rows(n, k, group, seed=m + n)
    layer.weight_loader(layer.weight, rows)
    assert layer.tinygemm is not None
    layer.bias.data = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    x = _x(m, k)
    got = layer(x)
    assert calls == [(_path(m), m)] and got.shape == (m, n) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, _ref(x, rows, layer.bias), **BF16)


def test_the_dequantized_matmul_in_slices_of_rows(monkeypatch):
    """A temporary bound of 384 rows of 4096: slices at 0, 384, 768 of 1000 rows, one output."""
    monkeypatch.setattr(dequant_int4_tinygemm, "DEQUANT_CHUNK_BYTES", 384 * 2 * 4096)
    monkeypatch.setattr(quant_int4, "TINYGEMM_GEMM_MAX_ROWS", 16)  # 300 rows: the dequantized path wherever it starts
    assert dequant_int4_tinygemm.chunk_rows(1000, 4096) == 384
    layer = _build(Int4Scheme(), ColumnParallelLinear, 4096, 1000, bias=True)
    rows = _rows(1000, 4096, 128, seed=7)
    layer.weight_loader(layer.weight, rows)
    layer.bias.data = torch.randn(1000, device="cuda", dtype=torch.bfloat16)
    x = _x(300, 4096)
    torch.testing.assert_close(layer(x), _ref(x, rows, layer.bias), **BF16)


@pytest.mark.parametrize("m", [4, 64, 300])
def test_each_path_inside_a_cuda_graph(m, monkeypatch):
    """4 rows replay tinygemm, 64 the GEMM on its layout, 300 the dequantizing kernel and cuBLAS (its temporary
    from the graph's pool)."""
    calls = _spy_paths(monkeypatch)
    layer = _build(Int4Scheme(), ColumnParallelLinear, 4096, 1024, bias=True)
    rows = _rows(1024, 4096, 128, seed=1)
    layer.weight_loader(layer.weight, rows)
    layer.bias.data = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    x = _x(m, 4096)
    layer(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    assert {name for name, _ in calls} == {_path(m)}
    for seed in range(2):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 10)).to(x))
        graph.replay()
        torch.testing.assert_close(out, _ref(x, rows, layer.bias), **BF16)


def test_tiny_llama_logits_through_each_path(tiny_models, monkeypatch):
    """The oracle: the same int4 model (levels, scales and zeros quantized alike from the float32 checkpoint) run
    in float32 (the Triton kernels' float32 path). The baseline: the Triton kernels in bf16 (bf16 activations,
    float32 scales). tinygemm, the GEMM on its layout and the dequantized weight (their values: scale and zero
    rounded to bf16, each weight rounded to bf16) add to the activations' bf16 rounding one of about the same size
    on every weight; independent errors add in quadrature, so theirs may be up to sqrt(2) the baseline's: at most
    1.5x + 1e-3, and the top-1 token as often the oracle's (within 2 of 40 positions). Comparing the two bf16 paths
    with each other instead doubles both errors (on the H200: 0.0207 relative, each about 0.015 from the oracle)."""
    from parity_helpers import prefill_logits

    from scaleinfer.config import CacheConfig, ModelConfig
    from scaleinfer.weights.source import resolve_model
    from scaleinfer.worker.model_runner import ModelRunner

    folder, _ = tiny_models["llama3.1"]
    ids = torch.randint(2, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()  # 2 chunks of 20 rows

    def runner(dtype: str, tinygemm: bool) -> ModelRunner:
        config = ModelConfig(str(folder), device="cuda", dtype=dtype, quantization="int4", enforce_eager=True)
        built = ModelRunner(config, CacheConfig(num_blocks=64), resolve_model(str(folder)), progress=False)
        served = [m.tinygemm is not None for m in built.model.modules() if hasattr(m, "tinygemm")]
        assert served and served == [tinygemm] * len(served)
        return built

    oracle = prefill_logits(runner("float32", tinygemm=False), ids).float()
    bf16 = runner("bfloat16", tinygemm=True)
    calls = _spy_paths(monkeypatch)
    gemm = prefill_logits(bf16, ids).float()
    assert {name for name, _ in calls} == {"tinygemm_gemm"}  # 16 < 20 rows <= TINYGEMM_GEMM_MAX_ROWS
    calls.clear()
    monkeypatch.setattr(quant_int4, "TINYGEMM_GEMM_MAX_ROWS", 16)
    dequantized = prefill_logits(bf16, ids).float()
    assert {name for name, _ in calls} == {"dequant_tinygemm_mm"}
    calls.clear()
    monkeypatch.setattr(quant_int4, "TINYGEMM_MAX_ROWS", 64)
    through_tinygemm = prefill_logits(bf16, ids).float()
    assert {name for name, _ in calls} == {"tinygemm_mm"}
    del bf16
    monkeypatch.setattr(quant_int4, "_tinygemm_serves", lambda layer: False)
    triton = prefill_logits(runner("bfloat16", tinygemm=False), ids).float()

    def errors(logits: torch.Tensor) -> tuple[float, float]:
        top1 = (logits.argmax(-1) == oracle.argmax(-1)).float().mean().item()
        return ((logits - oracle).norm() / oracle.norm()).item(), top1

    base_err, base_top1 = errors(triton)
    assert base_err < 0.05, base_err  # bf16 activations through two layers: a few percent
    for logits in (through_tinygemm, gemm, dequantized):
        err, top1 = errors(logits)
        assert err < 1.5 * base_err + 1e-3, (err, base_err)
        assert top1 >= base_top1 - 0.05, (top1, base_top1)
