# recipes/08_zero_full.py: full fine-tuning of BLOOM-7B1 on PromptCBLUE with DeepSpeed ZeRO-3 and the 🤗 Trainer.
# Run from a terminal, one process per GPU:   deepspeed --num_gpus 4 recipes/08_zero_full.py
# (torchrun --nproc_per_node 4 recipes/08_zero_full.py is the same). Needs: 4 GPUs of 40 GB (A100-40GB; the fit
# check in notebook 08 predicts each profile), pip install deepspeed, and PromptCBLUE's train.json, which is not on
# the Hugging Face Hub: download it by hand (https://github.com/michael-wzhu/PromptCBLUE) into DATA's folder.
# ZeRO-3 shards the weights, gradients and Adam states over the GPUs: each holds 1/NUM_GPUS of them.
# Taught in notebooks/08_multi_gpu_training.ipynb (theory: lessons/08_multi_gpu_training.md);
# what ZeRO-3 keeps on each GPU: notebooks/07_deepspeed_zero.ipynb.
import json
import os
import re

import torch
from datasets import load_dataset
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments,
                          set_seed)

MODEL = "bigscience/bloom-7b1"
DATA = "datasets/PromptCBLUE/train.json"  # the training kit's path; PromptCBLUE v0.1: 68,500 rows, 16 tasks
MAX_STEPS = 800                           # about 3 epochs: 68,500 rows / 256 a step = 268 steps an epoch
OUTPUT_DIR = "outputs/recipe-08-zero3-full"
MAX_SOURCE_LENGTH, MAX_TARGET_LENGTH = 512, 64  # the kit's --max_source_length / --max_target_length
MAX_LENGTH = 576                          # their sum: the longest example
BATCH_SIZE = 4                            # per GPU, as the kit
GRADIENT_ACCUMULATION = 16                # 4 GPUs x 4 x 16 = 256 examples a step, as the kit
LEARNING_RATE = 1e-5                      # every weight moves: far below the kit's 2e-4 for LoRA
SAVE_STEPS = 300                          # the kit's --save_steps
GRADIENT_CHECKPOINTING = True
ZERO_STAGE = 3                            # shard weights, gradients and optimizer states
NUM_GPUS = 4                              # the kit's 4 GPUs: start this many processes
USE_LORA = False                          # the kit's --use_lora: False trains every weight
LORA_R, LORA_ALPHA = 8, 32                # used only with USE_LORA = True (the kit's lora_config_chatglm_6b.json)
SEED = 42

set_seed(SEED)  # every rank starts from the same weights and draws the same data order
cuda = torch.cuda.is_available()
bf16 = cuda and torch.cuda.get_device_capability()[0] >= 8  # Ampere or newer; fp16 on a T4 or V100, fp32 on a CPU
fp16 = cuda and not bf16
world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by the launcher
if cuda and world_size != NUM_GPUS:
    print(f"{world_size} processes, not NUM_GPUS = {NUM_GPUS}: each GPU holds 1/{world_size} of the states")

# The course's configs/deepspeed/zero3.json: "auto" is filled from the TrainingArguments (batch, clipping, precision)
# and from the model's width (bucket sizes). Saving gathers the shards into one ordinary model.
deepspeed_config = {
    "zero_optimization": {"stage": ZERO_STAGE, "overlap_comm": True, "contiguous_gradients": True,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto",
                          "stage3_gather_16bit_weights_on_model_save": True},
    "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
}
# The TrainingArguments come before the model: while they exist, from_pretrained loads each weight straight into
# its shard on its GPU (deepspeed.zero.Init), so no device_map (transformers refuses one under ZeRO-3).
args = TrainingArguments(
    output_dir=OUTPUT_DIR, deepspeed=deepspeed_config, max_steps=MAX_STEPS, per_device_train_batch_size=BATCH_SIZE,
    gradient_accumulation_steps=GRADIENT_ACCUMULATION, learning_rate=LEARNING_RATE, lr_scheduler_type="cosine",
    warmup_steps=MAX_STEPS // 20, logging_steps=min(10, MAX_STEPS), logging_first_step=True,
    save_strategy="steps", save_steps=SAVE_STEPS, save_total_limit=2,  # a checkpoint of 7B with Adam: ~100 GB
    activation_checkpointing=GRADIENT_CHECKPOINTING, bf16=bf16, fp16=fp16, use_cpu=not cuda,
    seed=SEED, report_to="none",
)

tokenizer = AutoTokenizer.from_pretrained(MODEL)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=dtype)
model.config.use_cache = False  # the cache is for generation; training with checkpointing refuses it
if USE_LORA:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=LORA_R, lora_alpha=LORA_ALPHA,
                                             target_modules="all-linear"))


def tokenize(row):
    """prompt + answer + EOS; the labels are -100 on the prompt, so the loss is on the answer only."""
    prompt = tokenizer(row["input"], add_special_tokens=False)["input_ids"][-MAX_SOURCE_LENGTH:]  # keeps "答："
    answer = tokenizer(row["target"], add_special_tokens=False)["input_ids"][: MAX_TARGET_LENGTH - 1]
    answer = answer + [tokenizer.eos_token_id]
    return {"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
            "labels": [-100] * len(prompt) + answer}


if DATA.endswith((".json", ".jsonl")):
    data = load_dataset("json", data_files=DATA, split="train")
else:
    data = load_dataset(DATA, split="train")
with args.main_process_first(desc="tokenizing"):  # rank 0 tokenizes and caches, the others read its cache
    train = data.map(tokenize, remove_columns=data.column_names)


def last_complete_checkpoint(folder):
    # Like transformers.trainer_utils.get_last_checkpoint, but a checkpoint-N folder counts only once the Trainer has
    # written its trainer_state.json (it writes it last): a run killed mid-save resumes from the one before.
    steps = [int(name.split("-")[1]) for name in (os.listdir(folder) if os.path.isdir(folder) else [])
             if re.fullmatch(r"checkpoint-\d+", name)]
    for step in sorted(steps, reverse=True):
        try:
            with open(os.path.join(folder, f"checkpoint-{step}", "trainer_state.json")) as file:
                json.load(file)
            return os.path.join(folder, f"checkpoint-{step}")
        except (OSError, ValueError):  # missing, or cut off mid-write
            continue
    return None


trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                  data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
last = last_complete_checkpoint(OUTPUT_DIR)
print(f"resuming from {last}" if last else "training from the start")
trainer.train(resume_from_checkpoint=last)
trainer.save_model(OUTPUT_DIR)  # every rank calls it: the shards are gathered; rank 0 writes model.safetensors
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
if trainer.is_world_process_zero():
    print(f"{world_size} process(es), ZeRO-{ZERO_STAGE}: loss {losses[0]:.3f} at the start, {losses[-1]:.3f} "
          f"at the end ({trainer.state.global_step} steps); the model is in {OUTPUT_DIR}")
