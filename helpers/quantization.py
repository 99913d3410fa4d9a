"""What quantized weights really occupy, and which compute dtype a device should use.

`weight_bytes` measures a loaded model, byte by byte, including what bitsandbytes keeps beside its
4-bit codes (the absmax constants and, with double quantization, their own constants), so a
prediction of `helpers.memory.estimate_memory` can be checked against the real thing.
`preferred_compute_dtype` picks bf16 only where the GPU computes it natively.

Taught in notebooks/04_qlora_training.ipynb (the bytes of a model loaded in 4 bits against the prediction from its
configuration, the fp16 pitfall of older GPUs); NF4 and double quantization themselves are built from scratch in
notebooks/03_nf4_quantization.ipynb.
"""
from __future__ import annotations

from .env import bf16_supported

WEIGHT_PARTS = ("quantized values", "quantization constants", "other parameters")


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def weight_bytes(model) -> dict[str, int]:
    """Bytes of a model's weights as stored, by kind.

    Returns a dict with
      "quantized values"        packed NF4/FP4 codes of bitsandbytes `Params4bit` (two per byte),
                                and the int8 values of `Int8Params` (LLM.int8())
      "quantization constants"  one fp32 absmax per block; with double quantization the 8-bit
                                absmax codes, their fp32 block scales and the fp32 offset; the
                                per-row fp32 scales of LLM.int8()
      "other parameters"        every other parameter (embeddings, head, norms, biases, LoRA)
      "weights"                 the sum of the three above: what `estimate_memory` calls weights
      "lookup tables"           the 16-value 4-bit and 256-value 8-bit code tables, counted once
                                per distinct tensor; bitsandbytes keeps a copy per layer (64 bytes
                                and 1 KiB; not in "weights")
      "buffers"                 non-parameter tensors such as rotary frequencies (not in "weights")
    Taught in notebooks/04_qlora_training.ipynb.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"weight_bytes needs a torch.nn.Module (a loaded model), got {type(model).__name__}")
    parts = dict.fromkeys((*WEIGHT_PARTS, "lookup tables", "buffers"), 0)
    tables: set[int] = set()

    def table(code) -> None:
        if code is not None and code.data_ptr() not in tables:
            tables.add(code.data_ptr())
            parts["lookup tables"] += _nbytes(code)

    for param in model.parameters():
        kind = type(param).__name__
        state = getattr(param, "quant_state", None)
        if kind == "Params4bit" and state is not None:
            parts["quantized values"] += _nbytes(param)
            parts["quantization constants"] += _nbytes(state.absmax)
            table(state.code)
            if state.nested:
                parts["quantization constants"] += _nbytes(state.state2.absmax) + _nbytes(state.offset.reshape(-1))
                table(state.state2.code)
        elif kind == "Int8Params" and param.dtype == torch.int8:
            parts["quantized values"] += _nbytes(param)
            scales = getattr(param, "SCB", None)
            parts["quantization constants"] += _nbytes(scales) if scales is not None else 0
        else:
            parts["other parameters"] += _nbytes(param)
    for buffer in model.buffers():
        parts["buffers"] += _nbytes(buffer)
    parts["weights"] = sum(parts[k] for k in WEIGHT_PARTS)
    return parts


def preferred_compute_dtype(device=None):
    """The dtype to compute in on `device` (default: CUDA if available, else CPU).

    bf16 on GPUs that compute it natively (compute capability 8.0 and up: A100, A10, L4, RTX 30/40,
    H100); fp16 on older GPUs (T4, V100), where bf16 is only emulated and slow; fp32 on a CPU, where
    bitsandbytes and the course's tiny models train in full precision. On fp16 GPUs train with
    `fp16=True` and keep the trainable parameters in fp32 (peft does): see notebooks/04_qlora_training.ipynb.
    """
    import torch

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if bf16_supported(device) else torch.float16  # raises for other devices, or no GPU
