"""Fine-tune the course model on promptcblue_ctc through the 🤗 Trainer, with LoRA or every weight, on one or many processes.

The notebook-02 recipe as a script, so that a launcher can start it once per device. Taught in
notebooks/08_multi_gpu_training.ipynb (theory: lessons/08_multi_gpu_training.md). `--use_lora false` (the training
kit's flag) trains every weight instead: full fine-tuning, whose states are what ZeRO shards. The same file runs:

    python scripts/train_lora.py --output_dir outputs/run                        # 1 process
    torchrun --nproc_per_node 2 scripts/train_lora.py --output_dir outputs/run   # DDP, 2 processes
    deepspeed --num_gpus 2 scripts/train_lora.py \\
        --deepspeed configs/deepspeed/zero2.json --output_dir outputs/run        # DeepSpeed ZeRO-2
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 scripts/train_lora.py ...          # the same on CPU (gloo)

Rank 0 writes `<output_dir>/train_log.json` (per-step loss, world size, global batch, seconds, and the
model-state bytes each rank held at its last optimizer step) and saves the LoRA adapter, or with
`--use_lora false` the whole model (safetensors), and the tokenizer in `<output_dir>`; `--save_steps` also
keeps Trainer checkpoints (with DeepSpeed: one optimizer-state shard per rank under `global_step*/`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a clone that is not pip-installed
    sys.path.insert(0, str(REPO_ROOT))

from helpers.models import DEFAULT_MODEL  # noqa: E402  (light imports: no torch yet)
from helpers.prompts import PROMPT_RESPONSE_COLUMNS  # noqa: E402  (the prompt/response formats it trains)
from helpers.tuning import DEFAULT_LR  # noqa: E402  (the learning rates that suit the course model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_lora.py",
        description="LoRA or full fine-tuning of a causal LM with the 🤗 Trainer; launch it with python, torchrun, "
                    "deepspeed or accelerate launch (notebooks/08_multi_gpu_training.ipynb).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("model and data")
    data.add_argument("--model_name_or_path", default=DEFAULT_MODEL,
                      help="Hub id or local folder (offline, the default resolves to the course's stand-in)")
    data.add_argument("--dataset", default="promptcblue_ctc",
                      help="a name from data/dataset_info.json with a prompt/response format")
    data.add_argument("--max_train_samples", type=int, default=None, help="use only the first N training rows")
    data.add_argument("--max_source_length", type=int, default=None,
                      help="prompt tokens at most (default: the longest prompt of the data with this tokenizer; the training kit: 256)")
    data.add_argument("--max_target_length", type=int, default=None,
                      help="response tokens kept, EOS included (default: the longest response + EOS; the training kit: 16)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--use_lora", type=str.lower, choices=("true", "false"), default="true",
                      help="the training kit's flag: false trains every weight (full fine-tuning), the states ZeRO shards")
    lora.add_argument("--lora_r", type=int, default=8)
    lora.add_argument("--lora_alpha", type=int, default=16)
    lora.add_argument("--lora_dropout", type=float, default=0.05,
                      help="0 makes runs comparable step by step (no random masks)")
    train = parser.add_argument_group("training (🤗 TrainingArguments of the same names)")
    train.add_argument("--output_dir", required=True, help="where the adapter, log and checkpoints go")
    train.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config (configs/deepspeed/*.json)")
    train.add_argument("--per_device_train_batch_size", type=int, default=4)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--max_steps", type=int, default=20)
    train.add_argument("--learning_rate", type=float, default=None,
                       help=f"default: {DEFAULT_LR['lora']} with LoRA, {DEFAULT_LR['full']} for full fine-tuning "
                            "(helpers.tuning.DEFAULT_LR, for the course's tiny model); the training kit used 2e-4 on 6-12B models")
    train.add_argument("--lr_scheduler_type", default="cosine")
    train.add_argument("--optim", default="adamw_torch_fused",
                       help="🤗 TrainingArguments' default; helpers.tuning.finetune uses adamw_torch (the same AdamW, unfused)")
    train.add_argument("--warmup_steps", type=int, default=None, help="default: max_steps // 10, as notebook 02")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help='what "gradient_clipping": "auto" becomes')
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--logging_steps", type=int, default=1)
    train.add_argument("--save_steps", type=int, default=None,
                       help="keep a Trainer checkpoint every N steps; without it only the final adapter is saved")
    train.add_argument("--fp16", action="store_true", help="fp16 mixed precision (CUDA only)")
    train.add_argument("--bf16", action="store_true", help="bf16 mixed precision (Ampere+ GPUs)")
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--ddp_find_unused_parameters", type=str.lower, choices=("true", "false"), default="false",
                       help="DDP's search for parameters without gradients; LoRA has none to find, so keep false")
    train.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                       help="set by the deepspeed launcher; the script reads LOCAL_RANK from the environment")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad arguments with a message that names the argument, the value and what is allowed."""
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "logging_steps",
                 "lora_r", "lora_alpha"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    for name in ("max_train_samples", "save_steps", "max_source_length", "max_target_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer when given, got {getattr(args, name)}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        parser.error(f"--warmup_steps must be 0 or more, got {args.warmup_steps}")
    if not 0.0 <= args.lora_dropout < 1.0:
        parser.error(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.learning_rate is not None and args.learning_rate <= 0:
        parser.error(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.fp16 and args.bf16:
        parser.error("--fp16 and --bf16 exclude each other: choose one (bf16 on Ampere or newer GPUs)")
    if args.deepspeed is not None:
        path = Path(args.deepspeed)
        if not path.is_file():
            known = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "configs" / "deepspeed").glob("*.json"))
            parser.error(f"--deepspeed {args.deepspeed}: no such file; the course ships {', '.join(known) or 'none'}")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            parser.error(f"--deepspeed {args.deepspeed} is not valid JSON: {error}")
        if not isinstance(config, dict) or "zero_optimization" not in config:
            parser.error(f"--deepspeed {args.deepspeed} has no 'zero_optimization' section: not a ZeRO config")
    from helpers.data import dataset_info, dataset_names, real_dataset_names

    known = dataset_names() + real_dataset_names()  # real ones load online (offline, load_dataset names the stand-in)
    if args.dataset not in known:
        parser.error(f"--dataset {args.dataset!r} is unknown; known: {', '.join(known)}")
    fmt = dataset_info(args.dataset)["format"]
    if fmt not in PROMPT_RESPONSE_COLUMNS:
        parser.error(f"--dataset {args.dataset!r} has format {fmt!r}; this script trains the prompt/response "
                     f"formats {', '.join(PROMPT_RESPONSE_COLUMNS)}")


def engine(deepspeed_config: str | None, world_size: int) -> str:
    """What runs the training loop: 'DeepSpeed ZeRO-<stage>', 'DDP' or 'single process'."""
    if deepspeed_config:
        return f"DeepSpeed ZeRO-{json.loads(Path(deepspeed_config).read_text())['zero_optimization'].get('stage', 0)}"
    return "DDP" if world_size > 1 else "single process"


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ModelStateMeter:
    """Bytes of model states this process holds at its optimizer step: parameters, gradients, optimizer states.

    The 🤗 Trainer's torch AdamW does the update under every engine (DeepSpeed hands it this rank's shard, one
    parameter group at a time), so global torch.optim step hooks see what the formula counts
    (helpers.memory.zero_model_states):
      parameters  the model's weights held here: the whole tensor, or under ZeRO-3 the rank's shard
                  (`ds_tensor`) plus any weight gathered whole at that moment;
      gradients   the gradients the optimizer applies (under ZeRO-2/3 the rank's shard);
      optimizer   Adam's two moments, plus the master copy of the weights it updates where that copy is
                  not the model's own memory (DeepSpeed clones each rank's shard, even in fp32; plain PyTorch
                  updates the model's own weights).
    Buffers (communication buckets, activations) come on top and are not counted.
    """

    def __init__(self, model):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.model, self.last = model, None
        self._gradients, self._master, self._moments = {}, {}, {}  # per updated tensor: bytes at its last step
        self._handles = [register_optimizer_step_pre_hook(self._before), register_optimizer_step_post_hook(self._after)]

    @staticmethod
    def _updated(optimizer):
        return [p for group in optimizer.param_groups for p in group["params"]]

    def _before(self, optimizer, args, kwargs):
        for p in self._updated(optimizer):
            self._gradients[id(p)] = _nbytes(p.grad) if p.grad is not None else 0

    def _after(self, optimizer, args, kwargs):
        params, storages = 0, set()
        for p in self.model.parameters():
            for tensor in (p.data, getattr(p, "ds_tensor", None)):
                if tensor is not None and tensor.numel():
                    params += _nbytes(tensor)
                    storages.add(tensor.untyped_storage().data_ptr())
        for p in self._updated(optimizer):
            self._master[id(p)] = 0 if p.untyped_storage().data_ptr() in storages else _nbytes(p)
            self._moments[id(p)] = sum(_nbytes(t) for t in optimizer.state.get(p, {}).values()
                                       if hasattr(t, "dim") and t.dim() > 0)  # exp_avg, exp_avg_sq; not the step count
        gradients, master, moments = (sum(d.values()) for d in (self._gradients, self._master, self._moments))
        self.last = {"parameters": params, "gradients": gradients, "optimizer": master + moments,
                     "master_copy": master, "total": params + gradients + master + moments,
                     "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")}

    def close(self):
        for handle in self._handles:
            handle.remove()


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)

    import torch
    import transformers
    from transformers import Trainer, set_seed

    from helpers.data import load_dataset
    from helpers.models import load_model, load_tokenizer
    from helpers.prompts import collator, lengths_from_data, tokenize_dataset
    from helpers.tuning import prepare_model, training_arguments

    full = args.use_lora == "false"
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LR["full" if full else "lora"]
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    cuda = torch.cuda.is_available()
    if (args.fp16 or args.bf16) and not cuda:
        parser.error("--fp16/--bf16 need a CUDA GPU; on CPU the course trains in fp32 (leave both off)")
    if cuda:
        torch.cuda.set_device(local_rank)  # one GPU per process, before anything is allocated
    if rank != 0:
        transformers.logging.set_verbosity_error()

    # TrainingArguments first: with deepspeed=... it fills the config's "auto" values from these arguments.
    # helpers.tuning.training_arguments: the recipe finetune uses, plus what launching adds.
    training_args = training_arguments(
        args.output_dir, max_steps=args.max_steps, batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type, optim=args.optim,
        warmup_steps=args.max_steps // 10 if args.warmup_steps is None else args.warmup_steps,
        max_grad_norm=args.max_grad_norm, seed=args.seed, logging_steps=args.logging_steps,
        save_steps=args.save_steps, save_total_limit=None, gradient_checkpointing=args.gradient_checkpointing,
        deepspeed=args.deepspeed, fp16=args.fp16, bf16=args.bf16,
        ddp_find_unused_parameters=args.ddp_find_unused_parameters == "true")
    # Asking for the device sets up the process group now (gloo on CPU, NCCL on GPUs), from the variables the
    # launcher set: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
    training_args.device  # noqa: B018
    if args.deepspeed:
        # With a ZeRO-3 config from_pretrained loads the weights straight into shards (deepspeed.zero.Init),
        # which asks DeepSpeed's own communication layer for the world size. On CPU accelerate starts only
        # torch.distributed, so start DeepSpeed's layer on top of it here (a no-op when it already runs).
        import deepspeed

        deepspeed.init_distributed(dist_backend=training_args.distributed_state.backend)

    set_seed(args.seed)  # the same LoRA initialisation in every process and every run
    tokenizer = load_tokenizer(args.model_name_or_path)
    model = load_model(args.model_name_or_path, verbose=rank == 0)
    model = prepare_model(model, "full") if full else prepare_model(
        model, "lora", lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    # Counted before training; under ZeRO-3 a weight's own tensor is an empty placeholder, ds_numel its true size.
    def numel(p):
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    with training_args.main_process_first(desc="tokenizing"):  # rank 0 writes the datasets cache first
        train = load_dataset(args.dataset, split="train")
        if args.max_train_samples:
            train = train.select(range(min(args.max_train_samples, len(train))))
        if args.max_source_length is None or args.max_target_length is None:  # measured, as notebook 02 does
            measured = lengths_from_data(tokenizer, train)  # the format travels with the data's columns
            args.max_source_length = args.max_source_length or measured["max_source_length"]
            args.max_target_length = args.max_target_length or measured["max_target_length"]
        train = tokenize_dataset(train, tokenizer, max_source_length=args.max_source_length,
                                 max_target_length=args.max_target_length)

    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=collator(tokenizer))
    meter = ModelStateMeter(model)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    meter.close()
    model_states = [meter.last]
    if world_size > 1:  # every rank's measurement, gathered to all (a collective: every rank calls it)
        model_states = [None] * world_size
        torch.distributed.all_gather_object(model_states, meter.last)
    # Rank 0 writes adapter_model.safetensors + adapter_config.json, or with --use_lora false model.safetensors
    # (under ZeRO-3 every rank must call it: the shards are gathered collectively).
    trainer.save_model(args.output_dir)

    history = trainer.state.log_history
    log = {
        "engine": engine(args.deepspeed, world_size), "method": "full" if full else "lora",
        "deepspeed_config": args.deepspeed, "world_size": world_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "global_batch": world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps,
        "steps": trainer.state.global_step, "seconds": round(seconds, 2),
        "trainable_parameters": int(trainable), "total_parameters": int(total),
        "model_states": model_states,  # per rank, bytes at the last optimizer step (ModelStateMeter)
        "losses": [entry["loss"] for entry in history if "loss" in entry],
        "grad_norms": [entry.get("grad_norm") for entry in history if "loss" in entry],
        "device": "cuda" if cuda else "cpu", "args": vars(args),
    }
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
        Path(args.output_dir, "train_log.json").write_text(json.dumps(log, indent=1))
        print(f"[train_lora] {log['engine']}, {'full fine-tuning' if full else 'LoRA'}: world size {world_size}, "
              f"global batch {log['global_batch']}, "
              f"{log['steps']} steps in {seconds:.1f} s, loss {log['losses'][0]:.4f} -> {log['losses'][-1]:.4f}; "
              f"saved to {args.output_dir}", flush=True)
    if world_size > 1 and torch.distributed.is_initialized():
        # Leave together, and close the process group before the interpreter exits: a rank that exits with it still
        # open can abort in its teardown ("terminate called without an active exception", exit code -6), after a run
        # that trained and saved; a fresh clone's `make test` met it once.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return log


if __name__ == "__main__":
    main()
