"""Loading base models and tokenizers, offline included, and describing them.

`resolve_model` decides what `from_pretrained` gets: the real model when the Hub or the local cache
has it, the course's own stand-in when neither does. Taught in notebooks/00_setup_and_tour.ipynb.
LoRA target modules per family are taught in notebooks/01_lora_from_scratch.ipynb.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .env import REPO_ROOT, offline

DEFAULT_MODEL = "EleutherAI/pythia-70m-deduped"
STANDIN_DIR = REPO_ROOT / "models" / "tiny-neox-standin"
# Hub names the course can stand in for when the Hub is out of reach (same architecture family).
STANDINS = {DEFAULT_MODEL: STANDIN_DIR}


@dataclass(frozen=True)
class ModelChoice:
    """What was asked for, what `from_pretrained` will load, and why."""

    requested: str
    path: str
    standin: bool
    reason: str

    def __str__(self) -> str:
        if self.standin:
            return (f"{self.requested} -> stand-in {_short(self.path)} ({self.reason}). "
                    "This is the course's own tiny GPT-NeoX, NOT Pythia: see lessons/00_setup_and_tour.md.")
        return f"{self.requested} ({self.reason})"


def _short(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return path


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub (or `HF_ENDPOINT`) opens. Never called when offline."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached(name: str, revision: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model(name: str = DEFAULT_MODEL, revision: str | None = None) -> ModelChoice:
    """Decide where `name` is loaded from: a local folder, the Hub cache, the Hub, or the stand-in.

    `name` is a Hub id ("EleutherAI/pythia-70m-deduped") or a folder holding a saved model (config.json).
    Raises FileNotFoundError for a path that does not exist, and OSError, saying what is possible
    instead, for a Hub name that cannot be had offline. Taught in notebooks/00_setup_and_tour.ipynb.
    """
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a Hub id like {DEFAULT_MODEL!r} or a local folder, got {name!r}")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise OSError(f"{name} is a folder but has no config.json: not a saved Hugging Face model "
                          "(save one with model.save_pretrained(folder))")
        return ModelChoice(name, str(path) if name.startswith("~") else name, False, "local folder")
    if path.exists():
        raise OSError(f"{name} is a file; a model is a folder holding config.json and *.safetensors weights, "
                      "or a Hub id like 'EleutherAI/pythia-70m-deduped'")
    if not _is_hub_id(name):
        raise FileNotFoundError(f"{name}: no such model folder (and it is not a Hub id, which looks like "
                                f"'namespace/name', e.g. {DEFAULT_MODEL!r})")
    if _cached(name) if revision is None else _cached(name, revision):
        return ModelChoice(name, name, False, "from the local Hugging Face cache")
    if not offline() and hub_reachable():
        return ModelChoice(name, name, False, "from the Hugging Face Hub")
    why = "HF_HUB_OFFLINE=1" if offline() else "the Hugging Face Hub is not reachable"
    if name in STANDINS:
        path = STANDINS[name]
        if not (path / "config.json").is_file():
            raise OSError(f"{why}, and the stand-in {_short(str(path))} is missing: "
                          "rebuild it with `python -m helpers.standin build`")
        return ModelChoice(name, str(path), True, f"{why} and it is not in the local cache")
    raise OSError(f"{name} cannot be loaded: {why} and it is not in the local cache. Offline, the course "
                  f"stands in only for {', '.join(STANDINS)}; use that name, a local folder, or run where "
                  "the Hub is reachable.")


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _remote_code_kwargs(choice: ModelChoice, trust_remote_code: bool, revision: str | None) -> dict:
    """`trust_remote_code` and `revision` for from_pretrained, refusing to trust code that is not pinned.

    Code in a model repository runs with your rights when it is trusted; a branch name like "main" can
    change under you, a commit hash cannot. Taught in lessons/01_lora_from_scratch.md (families loaded with
    trust_remote_code).
    """
    if not isinstance(trust_remote_code, bool):
        raise TypeError(f"trust_remote_code must be True or False, got {trust_remote_code!r}")
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision must be a commit hash (a string of 40 hex digits), got {revision!r}")
    kwargs = {"trust_remote_code": trust_remote_code}  # explicit False: never run it, never ask
    if trust_remote_code and choice.reason != "local folder" and not _COMMIT.match(revision or ""):
        raise ValueError(f"trust_remote_code=True runs Python code from the {choice.requested} repository: read it, "
                         "then pin the commit you read with revision='<40-hex commit hash>' (a branch such as "
                         f"'main' can change under you); got revision={revision!r}")
    if revision is not None and choice.reason != "local folder":
        kwargs["revision"] = revision
    return kwargs


def _remote_code_refused(choice: ModelChoice, error: ValueError) -> ValueError | None:
    """The course's version of transformers' "contains custom code" error (None for any other error)."""
    if "trust_remote_code" not in str(error):
        return None
    return ValueError(f"{choice.requested} ships its own Python code (auto_map in its config), and the course does not "
                      "run code from a model repository. If you have read that code and trust it, pass "
                      "trust_remote_code=True with revision='<the commit you read>' (see CONTRIBUTING.md).")


def _without_pickle(choice: ModelChoice) -> None:
    """Refuse a local folder whose weights exist only in pickle formats (*.bin, *.pt, *.pth, *.ckpt)."""
    if choice.reason != "local folder":
        return
    folder = Path(choice.path)
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
    if pickled:
        raise OSError(f"{choice.path} holds weights only as pickle files ({', '.join(pickled)}); the course loads "
                      "safetensors only, because unpickling a file can run code. Convert them once, in a place you "
                      "trust: `from_pretrained(folder, use_safetensors=False).save_pretrained(new_folder)` writes "
                      "model.safetensors.")
    raise OSError(f"{choice.path} has a config.json but no *.safetensors weights: not a complete saved model")


def _resolved(name, revision: str | None) -> ModelChoice:
    """`name` resolved, unless it already is a ModelChoice (a caller that loads several things resolves once)."""
    return name if isinstance(name, ModelChoice) else resolve_model(name, revision)


def load_tokenizer(name: str = DEFAULT_MODEL, padding_side: str = "right", *, trust_remote_code: bool = False,
                   revision: str | None = None):
    """The tokenizer of `name` (resolved as `resolve_model` does, or a ModelChoice it returned), with a pad token set.

    padding_side: "right" for training, "left" for batched generation. trust_remote_code stays False
    unless you pass True with a pinned `revision` (a commit hash). Taught in notebooks/00_setup_and_tour.ipynb.
    """
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    choice = _resolved(name, revision)
    kwargs = {"local_files_only": offline(), **_remote_code_kwargs(choice, trust_remote_code, revision)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(choice.path, **kwargs)
    except ValueError as error:
        refused = _remote_code_refused(choice, error)
        if refused is None:
            raise
        raise refused from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(name: str = DEFAULT_MODEL, *, quantization: str | None = None, dtype=None,
               head: str = "causal-lm", num_labels: int = 1, double_quant: bool = True,
               compute_dtype=None, verbose: bool = True, trust_remote_code: bool = False,
               revision: str | None = None):
    """Load a base model through `from_pretrained`, optionally quantized with bitsandbytes.

    quantization: None, "nf4", "fp4" (4-bit) or "int8". head: "causal-lm" or
    "sequence-classification" (a reward model, `num_labels` outputs). Prints what was loaded and why.
    `name` may also be the ModelChoice that `resolve_model` returned (resolved once for several loads).
    Weights are loaded from safetensors only (never unpickled); `trust_remote_code` stays False unless
    you pass True with a pinned `revision` (a commit hash). With a CUDA GPU the model loads onto GPU 0 with
    `device_map` (never through CPU RAM); on a CPU it loads in float32 unless `dtype` says otherwise.
    Taught in notebooks/00_setup_and_tour.ipynb; quantized loading in notebooks/04_qlora_training.ipynb.
    """
    import torch
    import transformers

    heads = {"causal-lm": transformers.AutoModelForCausalLM,
             "sequence-classification": transformers.AutoModelForSequenceClassification}
    if head not in heads:
        raise ValueError(f"head must be one of {sorted(heads)}, got {head!r}")
    if quantization not in (None, "nf4", "fp4", "int8"):
        raise ValueError(f"quantization must be None, 'nf4', 'fp4' or 'int8', got {quantization!r}")
    if head == "sequence-classification" and (isinstance(num_labels, bool) or not isinstance(num_labels, int)
                                              or num_labels < 1):
        raise ValueError(f"num_labels must be a positive integer (1 for a reward model), got {num_labels!r}")
    choice = _resolved(name, revision)
    kwargs = {"local_files_only": offline(), "use_safetensors": True,
              **_remote_code_kwargs(choice, trust_remote_code, revision)}
    _without_pickle(choice)
    if head == "sequence-classification":
        kwargs["num_labels"] = num_labels
    cuda = torch.cuda.is_available()
    if quantization:
        from .env import bitsandbytes_4bit_status

        usable, why = bitsandbytes_4bit_status()
        if not usable:
            raise RuntimeError(f"quantization={quantization!r} needs bitsandbytes, which cannot run here ({why}). "
                               "Load without quantization, or run on a CUDA GPU / x86 CPU with bitsandbytes>=0.50.")
        from .quantization import preferred_compute_dtype

        compute_dtype = compute_dtype or preferred_compute_dtype()  # bf16, or fp16 on T4/V100, fp32 on CPU
        if quantization == "int8":
            config = transformers.BitsAndBytesConfig(load_in_8bit=True)
        else:
            config = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=quantization,
                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
        kwargs.update(quantization_config=config, device_map={"": 0} if cuda else "cpu")
    elif cuda:
        # Straight onto the GPU, tensor by tensor: a 7B model is never staged whole in CPU RAM, which can be
        # smaller than its 16-bit weights (7.07B parameters: 14 GB for bloom-7b1).
        kwargs["device_map"] = {"": 0}
    if dtype is not None:
        kwargs["dtype"] = dtype
    elif not cuda and not quantization:
        # transformers 5 loads a checkpoint in its stored dtype, and Pythia's are stored in float16: on a CPU that
        # is slow, lossy for training, and mixes dtypes with float32 adapters. Pass dtype= to study precision.
        kwargs["dtype"] = torch.float32
    try:
        model = heads[head].from_pretrained(choice.path, **kwargs)
    except ValueError as error:
        refused = _remote_code_refused(choice, error)
        if refused is None:
            raise
        raise refused from error
    except OSError as error:
        if "safetensors" not in str(error):
            raise
        raise OSError(f"{choice} has no safetensors weights; the course loads safetensors only, because unpickling "
                      f"a file can run code ({error})") from error
    if quantization and not cuda:
        keep_cpu_4bit_weights_trainable(model)
    if head == "sequence-classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if verbose:
        n = sum(p.numel() for p in model.parameters())
        print(f"Loaded {choice}\n  {type(model).__name__}, {n / 1e6:.2f}M parameters, "
              f"{model.get_memory_footprint() / 2**20:.1f} MiB of weights"
              + (f", quantization={quantization}" if quantization else ""))
    return model


def keep_cpu_4bit_weights_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights in place on AVX512-BF16 CPUs.

    The first no-grad forward in eval mode repacks each Linear4bit's weight for fast CPU inference,
    after which training fails or silently loses gradients (../shared/FACTS.md). Returns how many
    layers were changed. Taught in notebooks/04_qlora_training.ipynb.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


# --- LoRA target modules per model family (taught in notebooks/01_lora_from_scratch.ipynb) -----------
# "attention": what classic LoRA adapts (query/value, or the fused qkv projection);
# "all": every linear layer of the transformer blocks, the QLoRA finding.
LORA_TARGET_MODULES: dict[str, dict[str, list[str]]] = {
    "gpt_neox": {"attention": ["query_key_value"],
                 "all": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]},
    "bloom": {"attention": ["query_key_value"],
              "all": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]},
    "falcon": {"attention": ["query_key_value"],
               "all": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]},
    "llama": {"attention": ["q_proj", "v_proj"],
              "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "mistral": {"attention": ["q_proj", "v_proj"],
                "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "qwen2": {"attention": ["q_proj", "v_proj"],
              "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "gpt2": {"attention": ["c_attn"], "all": ["c_attn", "c_proj", "c_fc"]},
    "opt": {"attention": ["q_proj", "v_proj"],
            "all": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]},
    # Families loaded with trust_remote_code (their code lives in the model repository, not in
    # transformers): names from THUDM/chatglm2-6b, baichuan-inc/Baichuan2-7B-Base and Qwen/Qwen-7B.
    "chatglm": {"attention": ["query_key_value"],
                "all": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]},
    "baichuan": {"attention": ["W_pack"], "all": ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "qwen": {"attention": ["c_attn"], "all": ["c_attn", "c_proj", "w1", "w2"]},
}


def lora_target_modules(model_or_type, which: str = "all") -> list[str]:
    """LoRA target module names for a model (or its `config.model_type`), "attention" or "all".

    Taught in notebooks/01_lora_from_scratch.ipynb.
    """
    if isinstance(model_or_type, str):
        model_type = model_or_type
    elif isinstance(getattr(getattr(model_or_type, "config", None), "model_type", None), str):
        model_type = model_or_type.config.model_type
    else:
        raise TypeError("lora_target_modules takes a model (with .config.model_type) or a model type such as "
                        f"'gpt_neox', got {type(model_or_type).__name__}")
    if which not in ("attention", "all"):
        raise ValueError(f"which must be 'attention' or 'all', got {which!r}")
    if model_type not in LORA_TARGET_MODULES:
        raise ValueError(f"no LoRA target modules known for model family {model_type!r}; known: "
                         f"{', '.join(sorted(LORA_TARGET_MODULES))}. Pass target_modules yourself, or "
                         "target_modules='all-linear' to let peft take every linear layer but the head.")
    return list(LORA_TARGET_MODULES[model_type][which])


# --- Counting parameters (taught in notebooks/00_setup_and_tour.ipynb) ---------------------------
def count_parameters(model) -> dict[str, float]:
    """Trainable and total parameters, and the trainable share in percent."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "share_%": 100.0 * trainable / max(total, 1)}


def parameter_table(model, depth: int = 2):
    """Parameters grouped by the first `depth` parts of their names (layer numbers merged), as a DataFrame."""
    import re

    import pandas as pd

    groups: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        key = re.sub(r"\.\d+(?=\.|$)", ".N", ".".join(name.split(".")[:depth + 1]))
        row = groups.setdefault(key, [0, 0])
        row[0] += param.numel()
        row[1] += param.numel() if param.requires_grad else 0
    total = sum(row[0] for row in groups.values())
    frame = pd.DataFrame([(k, n, t, 100 * n / total) for k, (n, t) in groups.items()],
                         columns=["module", "parameters", "trainable", "share_%"])
    return frame.round({"share_%": 2})


@contextlib.contextmanager
def evaluating(model, tokenizer=None):
    """Eval mode (dropout off) and, given a tokenizer, left padding, for generating or scoring in batches.

    Both are put back afterwards, also after an error, so a model in the middle of training goes on training.
    Left padding makes every row's last token its prompt's end, so the new tokens line up (right padding would
    put pad tokens between a short prompt and its answer). Taught in notebooks/02_lora_training.ipynb
    (helpers.generation.generate uses it).
    """
    was_training = model.training
    side = tokenizer.padding_side if tokenizer is not None else None
    model.eval()
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    try:
        yield model
    finally:
        model.train(was_training)
        if tokenizer is not None:
            tokenizer.padding_side = side
