"""Measured latency: time plain modules on a backend, with a cache, for latency-aware export and budgets.

FLOPs are not time (DESIGN.md): a thin pair can be slower than the dense layer it
replaces, most of all at small inputs and batch 1. So export can time, per layer
and at the real input shape, the dense form and the thin pair on the backend the
model will run on, and keep the faster one.

Backends: "eager" (PyTorch on the CPU), "eager_prepared" (eager after the usual CPU
preparation: batch norm folded into the convolutions by torch.fx, channels_last),
"compiled" (torch.compile with inductor and freezing: batch norm folded, activations fused,
weights prepacked), "onnxruntime" (ONNX Runtime on the CPU), "cuda" (PyTorch on the GPU).
The PyTorch ones need nothing beyond torch ("compiled" needs a C++ compiler, as inductor does;
"eager_prepared" a model torch.fx can trace).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import shutil
import statistics
import time
import warnings

import torch
from torch import nn

from .stats import logits_of

BACKENDS = ("eager", "eager_prepared", "compiled", "onnxruntime", "cuda")

# (backend, threads, layer signature, input shape) -> median milliseconds. Layers are timed with
# their own (random) weights, but the time depends only on the signature and the input shape.
_CACHE: dict[tuple, float] = {}


@contextlib.contextmanager
def threads(n: int):
    """torch's intra-op threads (and so ONNX Runtime's, see _onnx_session) set to n inside the block; 0 = as they are."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_backend(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "compiled" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++")
                                         if c):
        raise ValueError("backend='compiled' needs a C++ compiler for torch.compile's inductor (none of $CXX, c++, "
                         "g++, clang++ found); use 'eager' or 'onnxruntime'")
    if backend == "cuda" and not torch.cuda.is_available():
        raise ValueError("backend='cuda' but torch.cuda.is_available() is False; use 'eager' or 'onnxruntime'")
    if backend == "onnxruntime":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ValueError("backend='onnxruntime' needs onnx and onnxruntime: pip install 'svdtrain[tool]'") from None


class _Logits(nn.Module):
    """`module` returning its logits alone, so that a model whose output is a tuple or an object exports."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        # The exporter restores the wrapper's mode recursively afterwards; a new module is in
        # training mode, which would leave `module` training (batch statistics in its batch norms).
        self.train(module.training)

    def forward(self, x):
        return logits_of(self.module(x))


def _onnx_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """`module`'s logits at `example` as an ONNX model (input "x"), the exporter's messages silenced."""
    import logging

    buffer = io.BytesIO()
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript-based exporter: a fraction of a second per small module, where the
            # dynamo exporter takes seconds; both produce the same Conv/Gemm nodes.
            torch.onnx.export(_Logits(module), (example,), buffer, dynamo=False, input_names=["x"])
    finally:
        onnx_log.setLevel(level)
    return buffer.getvalue()


def _onnx_session(module: nn.Module, example: torch.Tensor):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Spinning worker threads keep a core busy after each run; with several sessions timed in turn
    # (dense vs thin) they steal time from each other and the comparison is biased.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(_onnx_bytes(module, example), options, providers=["CPUExecutionProvider"])


def prepared(module: nn.Module) -> nn.Module:
    """A copy of `module` prepared for eager CPU inference: conv-BN folding (torch.fx) and channels_last."""
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(copy.deepcopy(module).eval())
    except Exception as e:  # torch.fx raises many kinds of errors on code it cannot trace
        raise ValueError(f"backend='eager_prepared' needs a model torch.fx can trace ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''}); use 'eager' or 'compiled'") from None
    return folded.to(memory_format=torch.channels_last)


def compiled(module: nn.Module, example: torch.Tensor):
    """`module` (a copy, in eval mode) compiled by torch.compile's inductor for inference at `example`'s shape,
    with freezing: its weights become constants, so batch norm is folded into the convolutions and the
    weights are prepacked. Compiled now (one call on `example`); call the result under torch.no_grad()."""
    import torch._inductor.config as inductor_config

    module = copy.deepcopy(module).eval()

    def forward(x):
        return module(x)

    # Dynamo keeps compiled code on the code object it intercepts, up to a recompile limit per code
    # object: one code object per compiled model, so that models compiled in turn (dense, then the export,
    # then another batch size) neither share entries nor run into that limit and silently fall back to eager.
    forward.__code__ = forward.__code__.replace(co_name=f"svdtrain_compiled_{id(module)}")
    fast = torch.compile(forward, backend="inductor", dynamic=False)
    with inductor_config.patch(freezing=True), torch.no_grad():
        fast(example)
    return fast


def runner(module: nn.Module, example: torch.Tensor, backend: str):
    """A no-argument callable running one forward of `module` on `example` on the backend."""
    module = module.eval()
    if backend == "compiled":
        fast = compiled(module, example)

        def run_compiled():
            with torch.no_grad():
                fast(example)

        return run_compiled
    if backend == "eager_prepared":
        module = prepared(module)
        example = example.contiguous(memory_format=torch.channels_last) if example.dim() == 4 else example
    if backend == "onnxruntime":
        session, feed = _onnx_session(module, example), {"x": example.numpy()}
        return lambda: session.run(None, feed)
    if backend == "cuda":
        module, example = copy.deepcopy(module).cuda(), example.cuda()

        def run_cuda():
            with torch.inference_mode():
                module(example)
            torch.cuda.synchronize()

        return run_cuda

    def run_eager():
        with torch.inference_mode():
            module(example)

    return run_eager


def timings(runners: dict[str, callable], repeats: int = 20, warmup: int = 3) -> dict[str, list[float]]:
    """Milliseconds per call of each runner, `repeats` times; the runners alternate within each repeat so
    machine drift hits all alike."""
    times = {name: [] for name in runners}
    for _ in range(warmup):
        for run in runners.values():
            run()
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def paired_speedup(base: list[float], other: list[float]) -> dict:
    """How much faster `other` runs than `base`, from timings taken alternately (`timings`): the median of the
    paired ratios base / other, which cancels drift that hits both of a pair alike, with their interquartile
    range."""
    ratios = sorted(b / o for b, o in zip(base, other, strict=True))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"speedup": statistics.median(ratios), "speedup_iqr": [quartiles[0], quartiles[-1]]}


def paired_timing(dense, small, budget_s: float, min_repeats: int = 7) -> dict:
    """Two runners timed alternately for about `budget_s` seconds (`timings_for`): their medians {dense_ms, small_ms},
    how much faster `small` runs (`paired_speedup`) and the number of `repeats`."""
    ms = timings_for({"dense": dense, "small": small}, budget_s, min_repeats)
    return {"dense_ms": statistics.median(ms["dense"]), "small_ms": statistics.median(ms["small"]),
            **paired_speedup(ms["dense"], ms["small"]), "repeats": len(ms["dense"])}


def median_ms(runners: dict[str, callable], repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each runner (see `timings`)."""
    return {name: statistics.median(t) for name, t in timings(runners, repeats, warmup).items()}


def timings_for(runners: dict[str, callable], budget_s: float, min_repeats: int = 7,
                max_repeats: int = 1000) -> dict[str, list[float]]:
    """`timings` with as many repeats as fit in about `budget_s` seconds (small models get many)."""
    once = timings(runners, repeats=1, warmup=1)
    repeats = int(budget_s * 1e3 / max(sum(t[0] for t in once.values()), 1e-3))
    return timings(runners, max(min_repeats, min(max_repeats, repeats)), warmup=1)


def layer_signature(module: nn.Module) -> tuple:
    """What a plain layer's time depends on: its type and shape attributes (and those of a pair's parts)."""
    if isinstance(module, nn.Sequential):
        return tuple(layer_signature(m) for m in module)
    keys = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding",
            "dilation", "groups", "padding_mode")
    return (type(module).__name__, *(getattr(module, k, None) for k in keys), getattr(module, "bias", None) is None)


def _layer_runner(module: nn.Module, example: torch.Tensor, backend: str):
    """`runner` for one layer. For "compiled", the layer runs as inductor runs a lone convolution (oneDNN on
    channels_last tensors) but eagerly: compiling every candidate form would take seconds each. The
    whole-model check of `export` runs on the real backend."""
    if backend == "compiled":
        module = copy.deepcopy(module).to(memory_format=torch.channels_last)
        if example.dim() == 4:
            example = example.contiguous(memory_format=torch.channels_last)
        backend = "eager"
    return runner(module, example, backend)


def time_forms(forms: dict[str, nn.Module], input_shape: tuple, backend: str, budget_s: float = 0.5) -> dict[str, float]:
    """Median ms of each plain form at `input_shape` on `backend`, from the cache where it has them.

    The number of repeats (5 to 20) is chosen so measuring takes about `budget_s` seconds. Cached per
    backend, torch threads, layer signature and input shape.
    """
    keys = {name: (backend, torch.get_num_threads(), layer_signature(m), tuple(input_shape))
            for name, m in forms.items()}
    missing = {name: m for name, m in forms.items() if keys[name] not in _CACHE}
    if missing:
        example = torch.randn(input_shape, dtype=next(next(iter(missing.values())).parameters()).dtype)
        runners = {name: _layer_runner(m, example, backend) for name, m in missing.items()}
        once = median_ms(runners, repeats=1, warmup=1)
        repeats = max(5, min(20, int(budget_s * 1e3 / max(sum(once.values()), 1e-3))))
        for name, ms in median_ms(runners, repeats, warmup=0).items():
            _CACHE[keys[name]] = ms
    return {name: _CACHE[keys[name]] for name in forms}
