"""Will it fit? The course's one memory model, from a model's configuration alone (nothing downloaded).

    est = estimate_memory("bigscience/bloom-7b1", weights="nf4-dq", method="qlora", lora_r=64,
                          optimizer="paged-adamw-32bit", batch_size=1, seq_len=512,
                          gradient_checkpointing=True)
    est.table(); est.gib()

What each part of a training step keeps in memory, in bytes:
  weights      the base model: 4 bytes a parameter in fp32, 2 in fp16/bf16; quantized linear layers
               (bitsandbytes int8, ChatGLM int4, NF4, NF4 + double quantization) with their constants
  adapter      LoRA matrices or the P-Tuning v2 prefix encoder (fp32)
  gradients    one per trainable parameter, in the dtype the parameter is stored in
  optimizer    AdamW's two moments (8 bytes, or ~2 for 8-bit AdamW) + an fp32 master copy when
               16-bit weights are trained in mixed precision (the ZeRO paper's K = 12)
  activations  what the forward pass saves for the backward pass, for a batch and sequence length,
               with or without gradient checkpointing; the KV cache for inference
ZeRO stages shard the optimizer states (1), the gradients (2) and the parameters (3) over devices.

Taught in notebooks/03_nf4_quantization.ipynb (weights, quantization, LoRA, optimizer states; it writes
`count_parameters_from_config`, `quantized_bytes` and `lora_parameters`), notebooks/07_deepspeed_zero.ipynb (it
writes `zero_model_states`) and
notebooks/14_speed_and_memory.ipynb (activations: it writes `activation_elements_per_token`, adds the estimate up
from the pieces and validates it against published measurements). A notebook cell that starts with
`# saved in helpers/memory.py` holds the same code as the function here (tests/test_hygiene.py checks it): change
both. The formulas and their sources are in lessons/14_speed_and_memory.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

GIB = 2**30
GB = 10**9

# --- Architecture facts of models the course talks about --------------------------------------
# Copied from each model's published config.json on the Hugging Face Hub (the URL is in "source"),
# so that parameters and memory can be computed without downloading anything.
#   mlp: "gelu" (two matrices, up and down) or "swiglu" (gate, up, down; gate and up may be fused)
#   qkv_bias / linear_bias: whether the attention projection / the other linear layers have biases
#   norm_bias: LayerNorm (weight + bias) or RMSNorm (weight only)
#   embedding_norm: BLOOM's LayerNorm right after the word embeddings
KNOWN_CONFIGS: dict[str, dict] = {
    "EleutherAI/pythia-14m": dict(
        model_type="gpt_neox", hidden_size=128, num_layers=6, num_heads=4, num_kv_heads=4,
        intermediate_size=512, vocab_size=50304, tie_word_embeddings=False, mlp="gelu",
        qkv_bias=True, linear_bias=True, norm_bias=True, embedding_norm=False,
        source="https://huggingface.co/EleutherAI/pythia-14m/blob/main/config.json"),
    "EleutherAI/pythia-70m-deduped": dict(
        model_type="gpt_neox", hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=8,
        intermediate_size=2048, vocab_size=50304, tie_word_embeddings=False, mlp="gelu",
        qkv_bias=True, linear_bias=True, norm_bias=True, embedding_norm=False,
        source="https://huggingface.co/EleutherAI/pythia-70m-deduped/blob/main/config.json"),
    "EleutherAI/pythia-160m": dict(
        model_type="gpt_neox", hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
        intermediate_size=3072, vocab_size=50304, tie_word_embeddings=False, mlp="gelu",
        qkv_bias=True, linear_bias=True, norm_bias=True, embedding_norm=False,
        source="https://huggingface.co/EleutherAI/pythia-160m/blob/main/config.json"),
    "bigscience/bloom-560m": dict(
        model_type="bloom", hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16,
        intermediate_size=4096, vocab_size=250880, tie_word_embeddings=True, mlp="gelu",
        qkv_bias=True, linear_bias=True, norm_bias=True, embedding_norm=True,
        source="https://huggingface.co/bigscience/bloom-560m/blob/main/config.json"),
    "bigscience/bloom-7b1": dict(
        model_type="bloom", hidden_size=4096, num_layers=30, num_heads=32, num_kv_heads=32,
        intermediate_size=16384, vocab_size=250880, tie_word_embeddings=True, mlp="gelu",
        qkv_bias=True, linear_bias=True, norm_bias=True, embedding_norm=True,
        source="https://huggingface.co/bigscience/bloom-7b1/blob/main/config.json"),
    # ChatGLM-6B (trust_remote_code): 28 GLM blocks, 2D rotary positions, output head tied to the
    # word embeddings (the model card's "6.2B parameters"); vocabulary of the icetk update (130528).
    "THUDM/chatglm-6b": dict(
        model_type="chatglm", hidden_size=4096, num_layers=28, num_heads=32, num_kv_heads=32,
        intermediate_size=16384, vocab_size=130528, tie_word_embeddings=True, mlp="gelu",
        qkv_bias=True, linear_bias=True, norm_bias=True, embedding_norm=False,
        source="https://huggingface.co/THUDM/chatglm-6b/blob/main/config.json"),
    # ChatGLM2-6B: multi-query attention with 2 groups of 128 channels, SwiGLU (gate and up fused
    # into dense_h_to_4h), RMSNorm, bias on the qkv projection only, untied output layer.
    "THUDM/chatglm2-6b": dict(
        model_type="chatglm", hidden_size=4096, num_layers=28, num_heads=32, num_kv_heads=2,
        intermediate_size=13696, vocab_size=65024, tie_word_embeddings=False, mlp="swiglu",
        qkv_bias=True, linear_bias=False, norm_bias=False, embedding_norm=False, fused_gate_up=True,
        source="https://huggingface.co/THUDM/chatglm2-6b/blob/main/config.json"),
    # The QLoRA paper's LLaMA sizes (Dettmers et al., 2023, arXiv:2305.14314), as converted to
    # transformers by huggyllama; "30b" is the paper's 33B.
    "huggyllama/llama-7b": dict(
        model_type="llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
        intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False, mlp="swiglu",
        qkv_bias=False, linear_bias=False, norm_bias=False, embedding_norm=False,
        source="https://huggingface.co/huggyllama/llama-7b/blob/main/config.json"),
    "huggyllama/llama-13b": dict(
        model_type="llama", hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
        intermediate_size=13824, vocab_size=32000, tie_word_embeddings=False, mlp="swiglu",
        qkv_bias=False, linear_bias=False, norm_bias=False, embedding_norm=False,
        source="https://huggingface.co/huggyllama/llama-13b/blob/main/config.json"),
    "huggyllama/llama-30b": dict(
        model_type="llama", hidden_size=6656, num_layers=60, num_heads=52, num_kv_heads=52,
        intermediate_size=17920, vocab_size=32000, tie_word_embeddings=False, mlp="swiglu",
        qkv_bias=False, linear_bias=False, norm_bias=False, embedding_norm=False,
        source="https://huggingface.co/huggyllama/llama-30b/blob/main/config.json"),
    "huggyllama/llama-65b": dict(
        model_type="llama", hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=64,
        intermediate_size=22016, vocab_size=32000, tie_word_embeddings=False, mlp="swiglu",
        qkv_bias=False, linear_bias=False, norm_bias=False, embedding_norm=False,
        source="https://huggingface.co/huggyllama/llama-65b/blob/main/config.json"),
    # GLM-4-9B as transformers converted it (GlmForCausalLM, no remote code): grouped-query attention with 2 key/value
    # heads, SwiGLU with gate and up fused in one gate_up_proj, RMSNorm, bias on q/k/v only, untied output head.
    "THUDM/glm-4-9b-chat-hf": dict(
        model_type="glm", hidden_size=4096, num_layers=40, num_heads=32, num_kv_heads=2,
        intermediate_size=13696, vocab_size=151552, tie_word_embeddings=False, mlp="swiglu",
        qkv_bias=True, linear_bias=False, norm_bias=False, embedding_norm=False, fused_gate_up=True,
        source="https://huggingface.co/THUDM/glm-4-9b-chat-hf/blob/main/config.json (now zai-org/glm-4-9b-chat-hf)"),
    "mistralai/Mistral-7B-v0.1": dict(
        model_type="mistral", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        intermediate_size=14336, vocab_size=32000, tie_word_embeddings=False, mlp="swiglu",
        qkv_bias=False, linear_bias=False, norm_bias=False, embedding_norm=False,
        source="https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json"),
}

WEIGHT_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4", "nf4", "nf4-dq")
METHODS = ("inference", "full", "lora", "qlora", "freeze", "ptuning-v2")
OPTIMIZERS = ("adamw-32bit", "adamw-8bit", "paged-adamw-32bit", "paged-adamw-8bit")
_MLP_NAMES = ("dense_h_to_4h", "dense_4h_to_h", "gate_proj", "up_proj", "down_proj")
_FLOAT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# Optimizer state bytes per trainable parameter (master copy not included). bitsandbytes' 8-bit
# optimizers keep each moment in 8 bits with one fp32 absmax per block of 256 values.
_STATE_BYTES = {"adamw-32bit": 8.0, "paged-adamw-32bit": 8.0,
                "adamw-8bit": 2 + 2 * 4 / 256, "paged-adamw-8bit": 2 + 2 * 4 / 256}
# NF4 (QLoRA paper section 3): 4-bit codes, one fp32 absmax per block of 64 values; double
# quantization stores the absmax in 8 bits (after subtracting their mean) with one fp32 scale per
# block of 256 absmax values. Bits per parameter: 4.5 and 4 + 8/64 + 32/(64*256) = 4.127.
NF4_BLOCK, DQ_BLOCK = 64, 256
NF4_BITS = 4 + 32 / NF4_BLOCK
NF4_DQ_BITS = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * DQ_BLOCK)


# --- Counting parameters -------------------------------------------------------------------------
def _facts_from_config(config) -> dict:
    """Architecture facts from a transformers config (gpt_neox, bloom, llama, mistral, qwen2)."""
    get = lambda *names, default=None: next(  # noqa: E731
        (getattr(config, n) for n in names if getattr(config, n, None) is not None), default)
    model_type = getattr(config, "model_type", None)
    if model_type not in ("gpt_neox", "bloom", "llama", "mistral", "qwen2", "glm", "glm4"):
        raise ValueError(f"cannot read the architecture of model_type={model_type!r}; supported: gpt_neox, bloom, "
                         f"llama, mistral, qwen2, glm, glm4, or a name from KNOWN_CONFIGS: {', '.join(KNOWN_CONFIGS)}")
    hidden = get("hidden_size", "n_embed")
    heads = get("num_attention_heads", "n_head")
    swiglu = model_type in ("llama", "mistral", "qwen2", "glm", "glm4")
    glm = model_type in ("glm", "glm4")
    return dict(
        model_type=model_type, hidden_size=hidden, num_layers=get("num_hidden_layers", "n_layer"),
        num_heads=heads, num_kv_heads=get("num_key_value_heads", default=heads),
        intermediate_size=get("intermediate_size", default=4 * hidden), vocab_size=config.vocab_size,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)), mlp="swiglu" if swiglu else "gelu",
        qkv_bias=model_type in ("gpt_neox", "bloom", "qwen2", "glm", "glm4") and bool(get("attention_bias", default=True)),
        linear_bias=model_type in ("gpt_neox", "bloom"), norm_bias=not swiglu,
        embedding_norm=model_type == "bloom", fused_gate_up=glm,
        source=getattr(config, "_name_or_path", "") or "config")


def architecture(config_or_name) -> dict:
    """The architecture facts of a KNOWN_CONFIGS name or a transformers config, as a dict."""
    if isinstance(config_or_name, str):
        if config_or_name not in KNOWN_CONFIGS:
            raise ValueError(f"unknown model {config_or_name!r}: pass a transformers config "
                             f"(AutoConfig.from_pretrained(...)) or one of {', '.join(KNOWN_CONFIGS)}")
        return dict(KNOWN_CONFIGS[config_or_name], name=config_or_name)
    if isinstance(config_or_name, dict):
        return dict(config_or_name)
    return _facts_from_config(config_or_name)


def _block_linears(a: dict) -> list[tuple[str, int, int, bool]]:
    """(module name, in_features, out_features, has bias) of the linear layers in one block."""
    h, i = a["hidden_size"], a["intermediate_size"]
    kv = a["num_kv_heads"] * (h // a["num_heads"])
    lb = a["linear_bias"]
    if a["model_type"] in ("gpt_neox", "bloom", "chatglm"):
        up = 2 * i if a.get("fused_gate_up") else i
        return [("query_key_value", h, h + 2 * kv, a["qkv_bias"]), ("dense", h, h, lb),
                ("dense_h_to_4h", h, up, lb), ("dense_4h_to_h", i, h, lb)]
    attention = [("q_proj", h, h, a["qkv_bias"]), ("k_proj", h, kv, a["qkv_bias"]), ("v_proj", h, kv, a["qkv_bias"]),
                 ("o_proj", h, h, False)]
    if a.get("fused_gate_up"):  # GLM: gate and up in one matrix
        return attention + [("gate_up_proj", h, 2 * i, False), ("down_proj", i, h, False)]
    return attention + [("gate_proj", h, i, False), ("up_proj", h, i, False), ("down_proj", i, h, False)]


def count_parameters_from_config(config_or_name) -> dict:
    """Parameters of a decoder-only transformer from its configuration alone.

    Returns a dict: total, embeddings (input embeddings, plus the output head when it is not tied),
    lm_head (0 when tied), per_block, blocks (all blocks), per_block_linear (weights of the block's
    linear layers, what bitsandbytes quantizes), per_block_bias, norms (outside the blocks),
    quantizable (per_block_linear x layers), linear_layers (name, in, out, bias) of one block, and
    num_layers. bloom-7b1 gives 7,069,016,064 and pythia-70m 70,426,624.
    Taught in notebooks/03_nf4_quantization.ipynb.
    """
    a = architecture(config_or_name)
    h, L, V = a["hidden_size"], a["num_layers"], a["vocab_size"]
    norm = 2 * h if a["norm_bias"] else h
    linears = _block_linears(a)
    linear_weights = sum(n_in * n_out for _, n_in, n_out, _ in linears)
    linear_bias = sum(n_out for _, _, n_out, bias in linears if bias)
    per_block = linear_weights + linear_bias + 2 * norm
    word = V * h
    lm_head = 0 if a["tie_word_embeddings"] else V * h
    norms = norm + (norm if a.get("embedding_norm") else 0)  # final norm (+ BLOOM's embedding norm)
    total = word + lm_head + L * per_block + norms
    return {"total": total, "embeddings": word + lm_head, "lm_head": lm_head, "per_block": per_block,
            "blocks": L * per_block, "per_block_linear": linear_weights, "per_block_bias": linear_bias,
            "norms": norms, "quantizable": L * linear_weights, "num_layers": L,
            "linear_layers": linears}


def quantized_bytes(n_in: int, n_out: int, weights: str) -> float:
    """Bytes of one quantized weight matrix (out x in), constants included: int8 (LLM.int8), int4 (ChatGLM's
    quantization_bit=4), nf4, nf4-dq (NF4 + double quantization). A 4096 x 4096 matrix in nf4-dq: 8,654,852 bytes.
    Taught in notebooks/03_nf4_quantization.ipynb."""
    if weights not in ("int8", "int4", "nf4", "nf4-dq"):
        raise ValueError(f"weights must be one of ['int8', 'int4', 'nf4', 'nf4-dq'], got {weights!r}")
    n = n_in * n_out
    if weights == "int8":   # LLM.int8(): int8 values + one fp32 scale per output row (SCB)
        return n + 4 * n_out
    if weights == "int4":   # ChatGLM's quantization_bit=4: two values a byte + one fp16 scale per row
        return math.ceil(n / 2) + 2 * n_out
    blocks = math.ceil(n / NF4_BLOCK)
    if weights == "nf4":    # two codes a byte + one fp32 absmax per block of 64
        return math.ceil(n / 2) + 4 * blocks
    # nf4-dq: absmax in 8 bits, one fp32 scale per 256 of them, one fp32 offset (their mean) per tensor
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / DQ_BLOCK) + 4


def lora_parameters(config_or_name, r: int = 8, targets="all") -> int:
    """LoRA parameters r * (in + out) summed over the targeted linear layers of every block.

    targets: "all" (every linear layer of the blocks, the QLoRA recipe), "attention" (classic LoRA:
    the query/value or fused qkv projection, see helpers.models.LORA_TARGET_MODULES) or a list of
    module names. Taught in notebooks/03_nf4_quantization.ipynb.
    """
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"lora_r must be a positive integer, got {r!r}")
    a = architecture(config_or_name)
    names = _lora_names(a, targets)
    linears = _block_linears(a)
    per_block = sum(r * (n_in + n_out) for name, n_in, n_out, _ in linears if name in names)
    return a["num_layers"] * per_block


def _lora_names(a: dict, targets) -> set[str]:
    from .models import LORA_TARGET_MODULES

    linears = [name for name, *_ in _block_linears(a)]
    if targets == "all":
        return set(linears)
    if targets == "attention":
        return set(LORA_TARGET_MODULES[a["model_type"]]["attention"])
    if isinstance(targets, (list, tuple, set)):
        unknown = set(targets) - set(linears)
        if unknown:
            raise ValueError(f"lora_targets {sorted(unknown)} are not linear layers of this model; it has {linears}")
        return set(targets)
    raise ValueError(f"lora_targets must be 'all', 'attention' or a list of module names, got {targets!r}")


def prefix_parameters(config_or_name, pre_seq_len: int = 16, prefix_projection: bool = False,
                      prefix_hidden_size: int | None = None) -> int:
    """P-Tuning v2's prefix encoder: Embedding(N, layers*2*hidden), or with the projection
    Embedding(N, hidden) -> Linear(hidden, H) -> Tanh -> Linear(H, layers*2*hidden) (peft's
    PrefixTuningConfig, ChatGLM-6B's PrefixEncoder).

    ChatGLM2-6B's PrefixEncoder (multi-query attention) stores only the key/value groups: its width
    is kv = layers*2*kv_channels*multi_query_group_num (28*2*128*2 = 14336, 16x less than
    layers*2*hidden), and with the projection the table is Embedding(N, kv) -> Linear(kv, H) -> Tanh
    -> Linear(H, kv), H = hidden_size. peft does the same for every grouped-query model (GLM-4, Mistral):
    its token_dim becomes head_dim * num_key_value_heads, and the projection's width defaults to it.
    Taught in notebooks/05_ptuning_v2.ipynb."""
    a = architecture(config_or_name)
    if not isinstance(pre_seq_len, int) or pre_seq_len < 1:
        raise ValueError(f"pre_seq_len must be a positive integer, got {pre_seq_len!r}")
    h, L = a["hidden_size"], a["num_layers"]
    H = prefix_hidden_size or h
    if a["num_kv_heads"] != a["num_heads"]:  # grouped-query attention: only the key/value groups
        kv_width = a["num_kv_heads"] * (h // a["num_heads"])
        kv = L * 2 * kv_width
        if a["model_type"] == "chatglm":  # ChatGLM2's own PrefixEncoder
            return pre_seq_len * kv if not prefix_projection else pre_seq_len * kv + (kv * H + H) + (H * kv + kv)
        H = prefix_hidden_size or kv_width  # peft: Embedding(N, kv_width) -> Linear(kv_width, H) -> Linear(H, kv)
        if not prefix_projection:
            return pre_seq_len * kv
        return pre_seq_len * kv_width + (kv_width * H + H) + (H * kv + kv)
    out = L * 2 * h
    if not prefix_projection:
        return pre_seq_len * out
    return pre_seq_len * h + (h * H + H) + (H * out + out)


# --- ZeRO ----------------------------------------------------------------------------------------
def zero_model_states(num_params: int, *, stage: int, num_devices: int, k: float = 12,
                      offload_optimizer: bool = False, offload_params: bool = False,
                      param_bytes: float = 2, grad_bytes: float = 2) -> dict:
    """Model-state bytes per device under ZeRO (Rajbhandari et al., 2019, arXiv:1910.02054, section 5).

    Mixed-precision Adam keeps 2 bytes of fp16 parameters, 2 of fp16 gradients and K = 12 of
    optimizer states (fp32 master copy, momentum, variance) per parameter Psi:
      stage 0 (data parallel)  (2 + 2 + K) Psi
      stage 1 (optimizer)      2 Psi + 2 Psi + K Psi / N
      stage 2 (+ gradients)    2 Psi + (2 + K) Psi / N
      stage 3 (+ parameters)   (2 + 2 + K) Psi / N
    Psi = 7.5B, N = 64: 120 -> 31.4 -> 16.6 -> 1.9 GB. ZeRO-Offload (offload_optimizer, stages 1-3)
    keeps the optimizer states, and from stage 2 the gradient shards, in CPU memory; ZeRO-Infinity's
    offload_params (stage 3) moves the parameter shards there too. Returns bytes per device:
    params, gradients, optimizer, total, and cpu (what was offloaded, per device).
    Taught in notebooks/07_deepspeed_zero.ipynb.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices!r}")
    if num_params < 0:
        raise ValueError(f"num_params must be >= 0, got {num_params!r}")
    if offload_optimizer and stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3 (ZeRO-Offload)")
    if offload_params and stage != 3:
        raise ValueError("offload_params needs ZeRO stage 3 (ZeRO-Infinity)")
    n = num_devices
    params = param_bytes * num_params / (n if stage == 3 else 1)
    grads = grad_bytes * num_params / (n if stage >= 2 else 1)
    optimizer = k * num_params / (n if stage >= 1 else 1)
    cpu = 0.0
    if offload_optimizer:
        cpu += optimizer
        optimizer = 0.0
        if stage >= 2:
            cpu += grads
            grads = 0.0
    if offload_params:
        cpu += params
        params = 0.0
    return {"params": params, "gradients": grads, "optimizer": optimizer, "total": params + grads + optimizer,
            "cpu": cpu}


# --- Activations ---------------------------------------------------------------------------------
def activation_elements_per_token(config_or_name, seq_len: int = 512, attention: str = "sdpa",
                                  prefix_len: int = 0) -> dict:
    """Values one transformer block saves for backward, per token (Korthikanti et al., 2022,
    arXiv:2205.05198, section 4.1, without dropout masks since LLM fine-tuning uses no dropout):
      norms          2h (inputs of the two norms)
      attention      h (qkv input) + h + 2*kv (q, k, v) + h (input of the output projection)
                     + heads * (seq_len + prefix_len) softmax probabilities with eager attention
                     (memory-efficient SDPA / FlashAttention keep only a log-sum-exp per head)
      mlp            h (input) + 2i (GELU input and output) or 3i (SwiGLU gate, up and product)
    Taught in notebooks/14_speed_and_memory.ipynb.
    """
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention must be 'sdpa' (memory-efficient) or 'eager', got {attention!r}")
    a = architecture(config_or_name)
    h, i = a["hidden_size"], a["intermediate_size"]
    kv = a["num_kv_heads"] * (h // a["num_heads"])
    attn = 3 * h + 2 * kv + (a["num_heads"] * (seq_len + prefix_len) if attention == "eager" else 0)
    mlp = h + (3 * i if a["mlp"] == "swiglu" else 2 * i)
    return {"norms": 2 * h, "attention": attn, "mlp": mlp, "total": 2 * h + attn + mlp}


# --- The estimate --------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    """Bytes per component of one device's memory, and how they were computed."""

    components: dict[str, float]
    settings: dict
    parameters: dict = field(default_factory=dict)
    cpu_offloaded: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Bytes on the device: the sum of the components."""
        return float(sum(self.components.values()))

    def gib(self, component: str | None = None) -> float:
        """The total (or one component) in GiB (2**30 bytes, what nvidia-smi's MiB add up to)."""
        if component is None:
            return self.total / GIB
        if component not in self.components:
            raise ValueError(f"component must be one of {list(self.components)}, got {component!r}")
        return self.components[component] / GIB

    def gb(self, component: str | None = None) -> float:
        """The total (or one component) in GB (10**9 bytes, as the ZeRO paper counts)."""
        return self.gib(component) * GIB / GB

    def table(self):
        """The components as a pandas DataFrame (bytes, GiB, share of the total)."""
        import pandas as pd

        rows = [(name, int(round(b)), b / GIB, 100 * b / self.total if self.total else 0.0)
                for name, b in self.components.items()]
        rows.append(("total", int(round(self.total)), self.total / GIB, 100.0))
        return pd.DataFrame(rows, columns=["component", "bytes", "GiB", "share_%"]).round({"GiB": 3, "share_%": 1})

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.components.items() if v)
        return f"{self.total / GIB:.2f} GiB ({parts})"


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def estimate_memory(model, *, weights: str = "fp16", method: str = "lora", lora_r: int = 8,
                    lora_targets="all", lora_dropout: float = 0.0, pre_seq_len: int = 16,
                    prefix_projection: bool = False, prefix_hidden_size: int | None = None, num_trainable_layers: int = 2,
                    optimizer: str = "adamw-32bit", batch_size: int = 1, seq_len: int = 512,
                    gradient_checkpointing: bool = False, zero_stage: int = 0, num_devices: int = 1,
                    offload_optimizer: bool = False, compute_dtype: str | None = None,
                    attention: str = "sdpa", trainable_params: int | None = None) -> MemoryEstimate:
    """Predict one device's memory for inference or one fine-tuning step, from the configuration alone.

    model: a name from KNOWN_CONFIGS, a transformers config, or a parameter count (then only weights,
      gradients and optimizer states are estimated, and LoRA / prefix / freeze need `trainable_params`).
    weights: how the base weights are stored: fp32, fp16, bf16, int8 (LLM.int8), int4 (ChatGLM's
      quantization), nf4, nf4-dq (NF4 + double quantization). Quantized formats apply to the linear
      layers of the blocks; embeddings, head, norms and biases stay in `compute_dtype`.
    method: inference, full, lora, qlora (= lora, over 4-bit weights), freeze (the MLPs of the last
      `num_trainable_layers` blocks), ptuning-v2 (prefix of `pre_seq_len` tokens).
    lora_dropout: above 0, every adapted layer keeps a dropped-out copy of its input (compute dtype)
      and the dropout mask (1 byte) for backward: more activations than the base model's own.
    optimizer: adamw-32bit, adamw-8bit, paged-adamw-32bit (paging moves no bytes on average: it lets
      the states be evicted to CPU memory when a long batch spikes; it does not lower this estimate).
    compute_dtype: dtype of activations and of unquantized weights; default: the weights' dtype when
      they are floating point, else bf16. Use "fp32" for the course's CPU runs.
    attention: "sdpa" (memory-efficient kernels, no seq x seq matrix kept) or "eager".
    zero_stage / num_devices / offload_optimizer: ZeRO sharding of the trainable states
      (`zero_model_states`), and stage 3 shards the frozen weights too.
    Trainable parameters are fp32 with fp32 gradients (PEFT's default), except full fine-tuning of
    16-bit weights, which is mixed precision: 16-bit weights and gradients + an fp32 master copy.
    Taught in notebooks/03_nf4_quantization.ipynb and notebooks/14_speed_and_memory.ipynb.
    """
    _check("weights", weights, WEIGHT_FORMATS)
    _check("method", method, METHODS)
    _check("optimizer", optimizer, OPTIMIZERS)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    quantized = weights not in _FLOAT_BYTES
    if method == "full" and quantized:
        raise ValueError(f"method='full' trains every weight, which cannot be stored as {weights}: "
                         "use fp32/fp16/bf16, or method='lora'/'qlora' over quantized weights")
    if method == "qlora" and weights not in ("nf4", "nf4-dq", "int4"):
        raise ValueError(f"method='qlora' means LoRA over 4-bit weights; got weights={weights!r} "
                         "(use 'nf4-dq', or method='lora' for 16/8-bit weights)")
    if compute_dtype is None:
        compute_dtype = weights if not quantized else "bf16"
    _check("compute_dtype", compute_dtype, tuple(_FLOAT_BYTES))
    e = _FLOAT_BYTES[compute_dtype]
    notes: list[str] = []

    # Parameters: what is frozen, what is trained, how the frozen part is stored.
    if isinstance(model, (int, float)) and not isinstance(model, bool):
        if model <= 0:
            raise ValueError(f"a parameter count must be positive, got {model!r}")
        arch, counts = None, {"total": int(model)}
        total = int(model)
        if method in ("lora", "qlora", "freeze", "ptuning-v2") and trainable_params is None:
            raise ValueError(f"method={method!r} on a bare parameter count needs trainable_params=...; "
                             "pass a KNOWN_CONFIGS name or a config to have it computed")
        if quantized:
            notes.append("bare parameter count: every parameter treated as a quantizable linear weight")
        notes.append("bare parameter count: activations not estimated")
    else:
        arch = architecture(model)
        counts = count_parameters_from_config(arch)
        total = counts["total"]

    if method in ("lora", "qlora"):
        adapter = trainable_params if trainable_params is not None else lora_parameters(arch, lora_r, lora_targets)
    elif method == "ptuning-v2":
        adapter = trainable_params if trainable_params is not None else prefix_parameters(
            arch, pre_seq_len, prefix_projection, prefix_hidden_size)
    else:
        adapter = 0
    if method == "freeze":
        if trainable_params is not None:
            trained_base = trainable_params
        else:
            if not 1 <= num_trainable_layers <= counts["num_layers"]:
                raise ValueError(f"num_trainable_layers must be in 1..{counts['num_layers']}, "
                                 f"got {num_trainable_layers}")
            mlp = [(n_in, n_out, b) for name, n_in, n_out, b in counts["linear_layers"] if name in _MLP_NAMES]
            trained_base = num_trainable_layers * sum(n_in * n_out + (n_out if b else 0) for n_in, n_out, b in mlp)
    elif method == "full":
        trained_base = total
    else:
        trained_base = 0

    # Weights of the base model (trained base weights counted here too, in their training dtype).
    frozen = total - trained_base
    if not quantized:
        weight_bytes = total * _FLOAT_BYTES[weights]
        if method == "freeze":  # the trained MLPs are cast to fp32 (AMP needs fp32 trainable parameters)
            weight_bytes += trained_base * (4 - _FLOAT_BYTES[weights])
    elif arch is None:
        bits = {"int8": 8, "int4": 4, "nf4": NF4_BITS, "nf4-dq": NF4_DQ_BITS}[weights]
        weight_bytes = total * bits / 8 + trained_base * 4
    else:
        per_block_q = sum(quantized_bytes(n_in, n_out, weights) for _, n_in, n_out, _ in counts["linear_layers"])
        q_bytes, q_elems = counts["num_layers"] * per_block_q, counts["quantizable"]
        if method == "freeze" and trainable_params is None:  # the trained MLPs stay unquantized, in fp32
            mlp = [(n_in, n_out) for name, n_in, n_out, _ in counts["linear_layers"] if name in _MLP_NAMES]
            q_bytes -= num_trainable_layers * sum(quantized_bytes(i, o, weights) for i, o in mlp)
            q_elems -= num_trainable_layers * sum(i * o for i, o in mlp)
        elif method == "freeze":
            notes.append("freeze with trainable_params over quantized weights: trained part assumed unquantized")
        weight_bytes = q_bytes + (total - q_elems - trained_base) * e + trained_base * 4

    # Trainable states, sharded by ZeRO.
    trainable = adapter + trained_base
    mixed_precision = method == "full" and weights in ("fp16", "bf16")
    if method == "inference":
        states = {"params": 0.0, "gradients": 0.0, "optimizer": 0.0, "cpu": 0.0}
    else:
        k = _STATE_BYTES[optimizer] + (4 if mixed_precision else 0)
        grad_bytes = _FLOAT_BYTES[weights] if method == "full" else 4
        states = zero_model_states(trainable, stage=zero_stage, num_devices=num_devices, k=k,
                                   offload_optimizer=offload_optimizer, param_bytes=0, grad_bytes=grad_bytes)
    if zero_stage == 3:
        weight_bytes /= num_devices
    if optimizer.startswith("paged") and method != "inference":
        notes.append("paged optimizer: states live in CUDA unified memory and are evicted to CPU RAM only "
                     "under memory pressure; the steady-state estimate is unchanged")

    # Activations for one batch.
    activations = 0.0
    if arch is not None:
        L, h, V = arch["num_layers"], arch["hidden_size"], arch["vocab_size"]
        prefix = pre_seq_len if method == "ptuning-v2" else 0
        per_layer = activation_elements_per_token(arch, seq_len, attention, prefix)["total"]
        tokens = batch_size * seq_len
        kv = arch["num_kv_heads"] * (h // arch["num_heads"])
        if method == "inference":
            # KV cache of the whole sequence + one block's transient values; logits of the last token
            activations = (2 * L * kv * tokens + tokens * per_layer) * e + batch_size * V * 4
        else:
            if gradient_checkpointing:
                # each block's input is kept; during backward one block is recomputed in full
                blocks = (L * h + per_layer) * tokens * e
            else:
                blocks = L * per_layer * tokens * e
            if method in ("lora", "qlora") and lora_dropout > 0:
                adapted = _lora_names(arch, lora_targets)
                dropped = sum(n_in for name, n_in, _, _ in counts["linear_layers"] if name in adapted)
                blocks += (1 if gradient_checkpointing else L) * dropped * tokens * (e + 1)
            if prefix:
                blocks += 2 * L * h * batch_size * prefix * e  # the prefix keys and values of every layer
            # logits in compute dtype + fp32 log-softmax kept for backward + its fp32 gradient
            logits = tokens * V * (e + 8)
            activations = blocks + 2 * tokens * h * e + logits
    adapter_bytes = adapter * 4 / (num_devices if zero_stage == 3 else 1)
    components = {"weights": float(weight_bytes), "adapter": float(adapter_bytes),
                  "gradients": float(states["gradients"]), "optimizer": float(states["optimizer"]),
                  "activations": float(activations)}
    settings = dict(model=getattr(model, "_name_or_path", model) if not isinstance(model, dict) else "config",
                    weights=weights, method=method, lora_r=lora_r, lora_targets=lora_targets,
                    lora_dropout=lora_dropout, pre_seq_len=pre_seq_len,
                    optimizer=optimizer, batch_size=batch_size, seq_len=seq_len,
                    gradient_checkpointing=gradient_checkpointing, zero_stage=zero_stage, num_devices=num_devices,
                    offload_optimizer=offload_optimizer, compute_dtype=compute_dtype, attention=attention)
    parameters = {"total": total, "trainable": trainable, "adapter": adapter, "frozen": frozen}
    return MemoryEstimate(components=components, settings=settings, parameters=parameters,
                          cpu_offloaded=float(states["cpu"]), notes=notes)


# --- The recipes: will each one fit the reader's GPU? ---------------------------------------------
# One GPU per profile: its total memory as nvidia-smi shows it (T4 15,360 MiB, L4 23,034 MiB, A100 40,960 and
# 81,920 MiB: the "16 GB", "24 GB", "40 GB" and "80 GB" of the data sheets), and the 16-bit type it computes in
# (bf16 needs compute capability 8.0 or newer; a T4 is 7.5, so fp16 there). Colab's free GPU is the T4.
GPU_PROFILES: dict[str, dict] = {
    "T4": dict(memory_gib=15.0, dtype="fp16", note="16 GB; Colab's free GPU (compute capability 7.5: fp16)"),
    "L4": dict(memory_gib=22.5, dtype="bf16", note="24 GB; Colab's mid tier (compute capability 8.9)"),
    "A100-40GB": dict(memory_gib=40.0, dtype="bf16", note="40 GB; Colab's top tier, most clouds (8.0)"),
    "A100-80GB": dict(memory_gib=80.0, dtype="bf16", note="80 GB; clouds, clusters (8.0)"),
}
# Kept free for what the estimate does not count: the CUDA context (~0.3-0.5 GiB), cuBLAS workspaces and the
# caching allocator's fragmentation. The course's choice, not a measured constant.
CUDA_RESERVE_GIB = 1.0


class RecipeWontFit(MemoryError):
    """A recipe is predicted not to fit the chosen GPU: raised before anything loads."""


def recipe_constants(path) -> dict:
    """The module-level constants of a recipe script (`NAME = <literal>`, `A, B = <literal>, <literal>`), read with
    ast, nothing executed."""
    import ast
    from pathlib import Path

    path = Path(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    constants = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target, value = node.targets[0], node.value
        pairs = [(target, value)]
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
            pairs = list(zip(target.elts, value.elts))
        for name, expression in pairs:
            if isinstance(name, ast.Name) and name.id.isupper():
                try:
                    constants[name.id] = ast.literal_eval(expression)
                except ValueError:
                    pass  # computed, not a setting
    return constants


def _need(constants: dict, path, *names):
    missing = [n for n in names if n not in constants]
    if missing:
        raise ValueError(f"{path}: the memory check needs the constants {missing} (literal values at the top)")
    return [constants[n] for n in names]


def _recipe_kwargs(stem: str, c: dict, dtype: str, path) -> dict:
    """estimate_memory's arguments for one recipe, from its constants. One entry per recipe in recipes/."""
    model, batch, seq, ckpt = _need(c, path, "MODEL", "BATCH_SIZE", "MAX_LENGTH", "GRADIENT_CHECKPOINTING")
    common = dict(batch_size=batch, seq_len=seq, gradient_checkpointing=ckpt, compute_dtype=dtype)
    lora = dict(lora_r=c.get("LORA_R", 8), lora_dropout=c.get("LORA_DROPOUT", 0.0))
    if stem.startswith("02_"):    # LoRA over 16-bit weights
        return dict(model=model, weights=dtype, method="lora", **lora, **common)
    if stem.startswith("04_"):    # QLoRA: NF4 + double quantization, paged AdamW
        return dict(model=model, weights="nf4-dq", method="qlora", **lora,
                    optimizer="paged-adamw-32bit", **common)
    if stem.startswith("05_"):    # P-Tuning v2 or LoRA on a GLM model
        if c.get("METHOD", "p-tuning-v2") == "lora":
            return dict(model=model, weights=dtype, method="lora", **lora, **common)
        return dict(model=model, weights=dtype, method="ptuning-v2", pre_seq_len=c["PRE_SEQ_LEN"],
                    prefix_projection=c.get("PREFIX_PROJECTION", False), **common)
    if stem.startswith("08_"):    # DeepSpeed ZeRO over NUM_GPUS, full fine-tuning or LoRA
        stage, gpus = _need(c, path, "ZERO_STAGE", "NUM_GPUS")
        if c.get("USE_LORA", False):
            return dict(model=model, weights=dtype, method="lora", **lora, zero_stage=stage,
                        num_devices=gpus, **common)
        return dict(model=model, weights=dtype, method="full", zero_stage=stage, num_devices=gpus, **common)
    if stem.startswith("10_"):    # DPO with LoRA: chosen and rejected go through the model together
        return dict(model=model, weights=dtype, method="lora", **lora,
                    **(common | {"batch_size": 2 * batch}))
    raise ValueError(f"{path}: no memory model for this recipe; add its entry to helpers.memory._recipe_kwargs")


def recipe_memory(path, gpu: str) -> MemoryEstimate:
    """Predicted peak of one GPU for a recipe script at its full-size values, on a GPU profile."""
    from pathlib import Path

    from .env import REPO_ROOT

    _check("gpu", gpu, GPU_PROFILES)
    path = Path(path)
    if not path.is_absolute() and not path.exists():  # a notebook runs in notebooks/: recipes/ is the course's
        path = REPO_ROOT / path
    dtype = GPU_PROFILES[gpu]["dtype"]
    kwargs = _recipe_kwargs(path.stem, recipe_constants(path), dtype, path)
    estimate = estimate_memory(kwargs.pop("model"), **kwargs)
    if kwargs["method"] == "qlora":
        # prepare_model_for_kbit_training casts what is not quantized (embeddings, norms, biases) to fp32
        counts = count_parameters_from_config(estimate.settings["model"])
        estimate.components["fp32 upcast"] = (counts["total"] - counts["quantizable"]) * (4 - _FLOAT_BYTES[dtype])
        estimate.notes.append("prepare_model_for_kbit_training: the unquantized parameters in fp32")
    return estimate


def recipe_fit(path, gpu: str = "T4", *, full_size: bool = False):
    """A table of a recipe's predicted peak on every GPU profile, with ✓/✗; stops early if it will not fit.

    With full_size=True (the notebook's FULL_SIZE) and a profile `gpu` the recipe does not fit, raises
    RecipeWontFit with the prediction, the largest component and what to change: an hour before an out-of-memory
    error would have said less. Taught in the recipe sections of notebooks 02, 04, 05, 08 and 10; the memory model in 03 and 14.
    """
    import pandas as pd

    _check("gpu", gpu, GPU_PROFILES)
    rows = []
    for name, profile in GPU_PROFILES.items():
        estimate = recipe_memory(path, name)
        usable = profile["memory_gib"] - CUDA_RESERVE_GIB
        rows.append({"GPU": name, "dtype": profile["dtype"], "predicted GiB": round(estimate.gib(), 1),
                     "usable GiB": usable, "fits": "✓" if estimate.gib() <= usable else "✗",
                     "chosen": "←" if name == gpu else ""})
    table = pd.DataFrame(rows).set_index("GPU")
    chosen = table.loc[gpu]
    if full_size and chosen["fits"] == "✗":
        estimate = recipe_memory(path, gpu)
        biggest = max(estimate.components, key=estimate.components.get)
        fits = [name for name in table.index if table.loc[name, "fits"] == "✓"]
        advice = {
            "weights": "the weights alone are too big: quantize them (notebook 04's QLoRA recipe) or shard them "
                       "over more GPUs (notebook 07's ZeRO-3)",
            "activations": "lower BATCH_SIZE (raise GRADIENT_ACCUMULATION to keep the batch), shorten MAX_LENGTH, "
                           "or set GRADIENT_CHECKPOINTING = True",
        }.get(biggest, "train fewer parameters (LoRA), shard the states (ZeRO) or use an 8-bit optimizer")
        raise RecipeWontFit(
            f"{path}: predicted {estimate.gib():.1f} GiB on one {gpu}, which has {chosen['usable GiB']:g} GiB "
            f"usable ({GPU_PROFILES[gpu]['memory_gib']:g} GiB less {CUDA_RESERVE_GIB:g} for the CUDA context). "
            f"The largest part is {biggest} ({estimate.gib(biggest):.1f} GiB): {advice}. "
            f"It fits: {', '.join(fits) or 'none of the profiles'}. Set GPU to the card you have, or FULL_SIZE = False.")
    return table


def recipes_table(folder=None) -> str:
    """Markdown: every recipe's predicted peak GiB on every GPU profile (lesson 14's table)."""
    from pathlib import Path

    folder = Path(folder) if folder else Path(__file__).resolve().parents[1] / "recipes"
    header = "| recipe | model | " + " | ".join(f"{g} ({p['memory_gib']:g} GiB, {p['dtype']})"
                                                for g, p in GPU_PROFILES.items()) + " |"
    lines = [header, "|---|---|" + "---|" * len(GPU_PROFILES)]
    for path in sorted(folder.glob("[0-9][0-9]_*.py")):
        cells = []
        for gpu, profile in GPU_PROFILES.items():
            gib = recipe_memory(path, gpu).gib()
            cells.append(f"{gib:.1f} {'✓' if gib <= profile['memory_gib'] - CUDA_RESERVE_GIB else '✗'}")
        lines.append(f"| `recipes/{path.name}` | `{recipe_constants(path)['MODEL']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--recipes"]:
        sys.exit("usage: python -m helpers.memory --recipes   (the recipes' predicted memory per GPU, as markdown)")
    print(recipes_table())
