"""Mixed precision: the autocast context and gradient scaler a configured precision asks for (fp32 | bf16 | fp16)."""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> ContextManager:
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op context for fp32).

    bf16 works on CUDA and on CPU (torch's CPU autocast); fp16 only on CUDA: on CPU it raises, since
    half-precision CPU kernels are slow and its gradients would need a scaler torch has not got there.
    fp32 on CUDA is IEEE fp32 (``ieee_fp32``): torch runs cuDNN convolutions in TF32 by default on Ampere and
    later, which moved DeML's maps by up to 1.8e-3 (min-max normalised) on an H200; bf16 is the fast choice.
    """
    if precision == "fp32":
        return ieee_fp32() if device.type == "cuda" else contextlib.nullcontext()
    if precision not in DTYPES:
        raise ValueError(f"precision: expected fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """cuDNN convolutions and CUDA matmuls in IEEE fp32 (no TF32) inside the context; the flags are restored after."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def grad_scaler(precision: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A GradScaler for fp16 (its gradients underflow without loss scaling); None for fp32 and bf16."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def as_float32(output):
    """A model output NamedTuple with every floating-point tensor cast to float32 (losses run in fp32)."""
    fields = {name: value.float() for name, value in output._asdict().items()
              if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32}
    return output._replace(**fields) if fields else output
