"""QLoRA on bloom-7b1 on one GPU: measured peak memory, tokens/s and MFU next to the memory model.

    python benchmarks/gpu_qlora_bloom7b1.py                      # bloom-7b1, batch 4 x 512 tokens, 5 steps
    python benchmarks/gpu_qlora_bloom7b1.py --batch-size 1 --steps 10
    python benchmarks/gpu_qlora_bloom7b1.py --dry-run-cpu        # the same code on a 2-layer BLOOM, on CPU

Nothing is downloaded: the model is built from bloom-7b1's configuration (helpers.memory.KNOWN_CONFIGS)
with random weights, straight into 4-bit. Each linear layer of the 30 blocks is drawn on the GPU in
16 bits and quantized at once to NF4 with double quantization (bitsandbytes `Params4bit`), so neither
CPU nor GPU ever holds the 14 GB 16-bit model. Then: LoRA on every linear layer (r=64, alpha=16, the
QLoRA recipe), gradient checkpointing, paged AdamW 32-bit, bf16 autocast (fp16 on GPUs without bf16),
a few steps on random tokens. Random weights train at the same speed and with the same memory as real
ones; the losses mean nothing.

Prints peak GPU memory (allocated by tensors, and reserved by PyTorch's caching allocator, which is
what nvidia-smi shows less the CUDA context), tokens/s and model FLOPs utilisation next to
helpers.memory.estimate_memory's prediction. Without a GPU it prints why it skips and exits 0.
Taught in notebooks/14_speed_and_memory.ipynb; the formulas are in lessons/14_speed_and_memory.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/gpu_qlora_bloom7b1.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "bigscience/bloom-7b1"
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]  # every linear layer of a block
# Dense 16-bit tensor-core peaks from the vendors' datasheets, TFLOPS (no sparsity). MFU divides by these.
PEAK_TFLOPS = [("H200", 989), ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("A100", 312),
               ("L40S", 362), ("L4", 121), ("A10G", 70), ("A10", 125), ("RTX 4090", 165), ("V100", 125), ("T4", 65)]
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=256, vocab_size=1024)


def peak_tflops(device_name: str) -> float | None:
    """The datasheet 16-bit peak of a GPU, matched by name; None when unknown (pass --peak-tflops)."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return float(tflops)
    return None


def model_flops_per_token(facts: dict, lora_params: int, seq_len: int) -> float:
    """Model FLOPs of one training token, the PaLM paper's way (Chowdhery et al., 2022, arXiv:2204.02311,
    appendix B), for a frozen base with trainable adapters:
      frozen matmul weights N (blocks + output head): 2N forward + 2N backward for the input gradients
      LoRA weights n: 6n (forward, input gradients, weight gradients)
      attention scores and values: 12 * layers * hidden * seq_len
    Recomputation by gradient checkpointing is not counted: it is hardware FLOPs, not model FLOPs."""
    from helpers.memory import count_parameters_from_config

    counts = count_parameters_from_config(facts)
    matmul = counts["quantizable"] + facts["vocab_size"] * facts["hidden_size"]  # block linears + head
    return 4 * matmul + 6 * lora_params + 12 * facts["num_layers"] * facts["hidden_size"] * seq_len


def build_quantized_bloom(facts: dict, device, dtype, seed: int = 0):
    """BloomForCausalLM from `facts` with random weights, its block linears in NF4 + double quantization."""
    import bitsandbytes as bnb
    import torch
    import transformers
    from torch import nn

    config = transformers.BloomConfig(vocab_size=facts["vocab_size"], hidden_size=facts["hidden_size"],
                                      n_layer=facts["num_layers"], n_head=facts["num_heads"], use_cache=False)
    torch.manual_seed(seed)
    with torch.device("meta"):  # shapes only: no memory
        model = transformers.BloomForCausalLM(config)
    std = config.initializer_range

    def quantized(linear: nn.Linear):
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
        weight = torch.randn(linear.out_features, linear.in_features, device=device, dtype=dtype) * std
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                         module=layer)._quantize(device)
        del weight
        if linear.bias is not None:
            layer.bias = nn.Parameter(torch.zeros(linear.out_features, device=device, dtype=dtype), requires_grad=False)
        return layer

    for block in model.transformer.h:
        block.self_attention.query_key_value = quantized(block.self_attention.query_key_value)
        block.self_attention.dense = quantized(block.self_attention.dense)
        block.mlp.dense_h_to_4h = quantized(block.mlp.dense_h_to_4h)
        block.mlp.dense_4h_to_h = quantized(block.mlp.dense_4h_to_h)
    # The rest (embeddings, LayerNorms, biases left on meta) in 16 bits, as the QLoRA recipe keeps them;
    # the output head is skipped here and tied to the new embeddings below.
    for module in model.modules():
        if module is model.lm_head:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            if isinstance(module, nn.LayerNorm):
                value = torch.ones if name == "weight" else torch.zeros
                data = value(param.shape, device=device, dtype=dtype)
            else:
                data = torch.randn(param.shape, device=device, dtype=dtype) * std
            setattr(module, name, nn.Parameter(data, requires_grad=False))
    model.lm_head.weight = model.transformer.word_embeddings.weight  # BLOOM ties its output head
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"tensors still on the meta device: {left[:5]}")
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_qlora_bloom7b1.py", description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="measured steps (after one warm-up step)")
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="your GPU's 16-bit peak, for MFU")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="run the same code on a 2-layer BLOOM on CPU (checks the code, measures nothing useful)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.dry_run_cpu:
        print("SKIPPED: no CUDA GPU here. This script measures QLoRA on bloom-7b1 on one GPU (about 9 GiB at "
              "batch 4 x 512). Run it on Colab or any CUDA machine; `--dry-run-cpu` runs the same code on a tiny "
              "BLOOM on this CPU.")
        return 0

    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from helpers.env import bf16_supported
    from helpers.memory import KNOWN_CONFIGS, estimate_memory, lora_parameters

    cuda = not args.dry_run_cpu
    device = torch.device("cuda" if cuda else "cpu")
    facts = dict(KNOWN_CONFIGS[MODEL]) if cuda else dict(KNOWN_CONFIGS[MODEL], **TINY)
    bf16 = cuda and bf16_supported()  # compute capability >= 8.0; T4/V100 train in fp16 with a GradScaler
    dtype = (torch.bfloat16 if bf16 else torch.float16) if cuda else torch.float32
    compute = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    checkpointing = not args.no_gradient_checkpointing
    b, s = args.batch_size, args.seq_len

    started = time.perf_counter()
    model = build_quantized_bloom(facts, device, dtype)
    weights_bytes = torch.cuda.memory_allocated() if cuda else None
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=TARGETS))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in trainable)
    assert n_lora == lora_parameters(facts, args.lora_r, TARGETS), "LoRA parameter count differs from helpers.memory"
    optimizer = bnb.optim.PagedAdamW32bit(trainable, lr=2e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and not bf16)
    print(f"built {MODEL if cuda else 'a 2-layer BLOOM (dry run)'} in NF4 + double quantization in "
          f"{time.perf_counter() - started:.0f} s; {n_lora / 1e6:.1f}M LoRA parameters (r={args.lora_r}, all linear)")

    generator = torch.Generator(device=device).manual_seed(0)

    def step():
        ids = torch.randint(0, facts["vocab_size"], (b, s), device=device, generator=generator)
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up: kernels, allocator, optimizer states
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens_per_s = b * s * args.steps / seconds

    est = estimate_memory(facts if not cuda else MODEL, weights="nf4-dq", method="qlora", lora_r=args.lora_r,
                          lora_targets=TARGETS, lora_dropout=0.05, optimizer="paged-adamw-32bit", batch_size=b,
                          seq_len=s, gradient_checkpointing=checkpointing, compute_dtype=compute,
                          attention="eager")  # BLOOM's attention keeps its softmax (no SDPA kernel in transformers)
    print(f"\n{args.steps} steps of batch {b} x {s} tokens, gradient checkpointing {'on' if checkpointing else 'off'}; "
          f"losses {losses[0]:.2f} ... {losses[-1]:.2f} (random weights)")
    print(f"tokens/s: {tokens_per_s:,.0f}  ({seconds / args.steps:.2f} s/step)")
    if not cuda:
        print("dry run on CPU: the code path works; memory and speed are only measured on a GPU.")
        return 0
    GIB = 2**30
    peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    name = torch.cuda.get_device_name(0)
    print(f"\ndevice: {name}")
    print(f"{'':28}{'measured GiB':>14}{'predicted GiB':>15}{'ratio':>8}")
    print(f"{'weights after loading':28}{weights_bytes / GIB:>14.2f}{est.gib('weights'):>15.2f}"
          f"{est.gib('weights') / (weights_bytes / GIB):>8.2f}")
    print(f"{'peak allocated (training)':28}{peak / GIB:>14.2f}{est.gib():>15.2f}{est.gib() / (peak / GIB):>8.2f}")
    print(f"{'peak reserved (allocator)':28}{reserved / GIB:>14.2f}")
    print("predicted components:", est)
    peak_tf = args.peak_tflops or peak_tflops(name)
    flops = model_flops_per_token(facts, n_lora, s) * tokens_per_s
    if peak_tf:
        print(f"model FLOPs: {flops / 1e12:.1f} TFLOPS achieved of {peak_tf:.0f} peak -> MFU {100 * flops / (peak_tf * 1e12):.1f}%")
    else:
        print(f"model FLOPs: {flops / 1e12:.1f} TFLOPS achieved; unknown peak for {name!r}: pass --peak-tflops for MFU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
