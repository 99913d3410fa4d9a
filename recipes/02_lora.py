# recipes/02_lora.py: LoRA fine-tuning of a causal LM on PromptCBLUE-style prompt -> answer data, loss on the answer.
# Run: python recipes/02_lora.py   (one GPU; notebooks/02_lora_training.ipynb teaches every step at tiny size)
# Needs: pip install torch transformers peft datasets accelerate. bloom-7b1 in 16 bits needs an L4 (24 GB) or larger;
# on Colab's free T4 use recipes/04_qlora.py. PromptCBLUE is not on the Hub: download it (its README says where) and
# point DATA at train.json. Checkpoints go to OUTPUT_DIR every SAVE_STEPS; run it again and it resumes.
import json
import os
import re

import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments,
                          set_seed)

MODEL = "bigscience/bloom-7b1"
DATA = "PromptCBLUE/train.json"     # JSON Lines with "input" (the whole prompt) and "target" (the answer)
MAX_STEPS = 10000                   # the training kit's command: 10,000 steps, a checkpoint every 300
OUTPUT_DIR = "outputs/recipe-02-lora"
PROMPT_COLUMN, RESPONSE_COLUMN = "input", "target"
MAX_SOURCE_LENGTH, MAX_TARGET_LENGTH = 512, 64   # the kit's --max_source_length / --max_target_length
MAX_LENGTH = 576                    # their sum: the longest example
BATCH_SIZE = 4                      # per GPU
GRADIENT_ACCUMULATION = 16          # the kit: 4 GPUs x 4 x 16 = 256 examples a step; one GPU: 64
LEARNING_RATE = 2e-4
LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 32, 0.1
SAVE_STEPS = 300
GRADIENT_CHECKPOINTING = True       # recompute activations in backward: memory for time
SEED = 42

set_seed(SEED)
gpu = torch.cuda.is_available()
bf16 = gpu and torch.cuda.get_device_capability()[0] >= 8   # bf16 from Ampere on; a T4 computes in fp16
dtype = torch.bfloat16 if bf16 else torch.float16 if gpu else torch.float32

tokenizer = AutoTokenizer.from_pretrained(MODEL)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=dtype, device_map={"": 0} if gpu else None)
model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=LORA_R, lora_alpha=LORA_ALPHA,
                                         lora_dropout=LORA_DROPOUT, target_modules="all-linear"))
model.print_trainable_parameters()

local = DATA.endswith((".json", ".jsonl"))
rows = load_dataset("json", data_files=DATA, split="train") if local else load_dataset(DATA, split="train")


def tokenize(row):
    """prompt + answer + EOS; the labels are -100 on the prompt, so the loss is on the answer only."""
    prompt = tokenizer(row[PROMPT_COLUMN], add_special_tokens=False)["input_ids"][-MAX_SOURCE_LENGTH:]
    answer = tokenizer(row[RESPONSE_COLUMN], add_special_tokens=False)["input_ids"][: MAX_TARGET_LENGTH - 1]
    answer = answer + [tokenizer.eos_token_id]
    return {"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
            "labels": [-100] * len(prompt) + answer}


train = rows.map(tokenize, remove_columns=rows.column_names)
args = TrainingArguments(
    output_dir=OUTPUT_DIR, max_steps=MAX_STEPS, per_device_train_batch_size=BATCH_SIZE,
    gradient_accumulation_steps=GRADIENT_ACCUMULATION, learning_rate=LEARNING_RATE, lr_scheduler_type="cosine",
    warmup_steps=MAX_STEPS // 10, logging_steps=max(1, min(10, MAX_STEPS // 5)), save_steps=SAVE_STEPS,
    save_total_limit=3, bf16=bf16, fp16=gpu and not bf16, gradient_checkpointing=GRADIENT_CHECKPOINTING,
    gradient_checkpointing_kwargs={"use_reentrant": False}, seed=SEED, report_to="none", use_cpu=not gpu)
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


trainer = Trainer(model=model, args=args, train_dataset=train,
                  data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
last = last_complete_checkpoint(OUTPUT_DIR)
print(f"resuming from {last}" if last else "training from the start")
trainer.train(resume_from_checkpoint=last)
trainer.save_model(OUTPUT_DIR)      # the adapter (a few MB) and its config, beside the checkpoints
tokenizer.save_pretrained(OUTPUT_DIR)
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {trainer.state.global_step} steps; adapter in {OUTPUT_DIR}")
