# recipes/04_qlora.py: QLoRA fine-tuning of bloom-7b1 on multi-turn chats (4-bit NF4 base, LoRA adapters).
# Run it on a GPU from the course folder: python recipes/04_qlora.py. Started again after an interruption, it resumes
# from its last complete checkpoint in OUTPUT_DIR. Needs one 24 GB GPU (L4, A10, RTX 3090/4090) or an A100; on a
# 16 GB T4 set BATCH_SIZE = 1 and GRADIENT_ACCUMULATION = 16 (notebook 04's fit check predicts each GPU's peak).
# Needs the Hub (bloom-7b1, and the chats: one 8.7 GB file, downloaded once) and torch, transformers 5, peft,
# datasets, bitsandbytes, accelerate. Notebook 04 (notebooks/04_qlora_training.ipynb) teaches every line of it.
import json
import os
import re

import datasets
import torch
import transformers
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

MODEL = "bigscience/bloom-7b1"
# MOSS's chats in Firefly's layout, {"conversation": [{"human": ..., "assistant": ...}, ...]} (moss_003_sft in data/).
DATA = "YeungNLP/moss-003-sft-data"
MAX_STEPS = 1000
OUTPUT_DIR = "outputs/recipe-04-qlora"
MAX_LENGTH = 1024  # tokens per conversation, cut from the right
BATCH_SIZE = 4
GRADIENT_ACCUMULATION = 4  # 16 conversations per optimizer step
LEARNING_RATE = 2e-4  # QLoRA paper, 7B models
SAVE_STEPS = 100
GRADIENT_CHECKPOINTING = True  # recompute activations in backward: memory for time
LORA_R = 64  # QLoRA paper: r = 64, alpha = 16
LORA_ALPHA = 16
LORA_DROPOUT = 0.05
SEED = 42

# bf16 where the GPU computes it natively (compute capability 8.0 and up), fp16 on older GPUs (T4), fp32 on a CPU.
if torch.cuda.is_available():
    COMPUTE_DTYPE = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
else:
    COMPUTE_DTYPE = torch.float32
transformers.set_seed(SEED)

# The chats, as <s>question1</s>answer1</s>question2</s>answer2</s>..., with the loss on the answers (and their </s>).
if DATA.endswith((".json", ".jsonl")):
    chats = datasets.load_dataset("json", data_files=DATA, split="train")
else:
    chats = datasets.load_dataset(DATA, split="train")
chats = chats.shuffle(seed=SEED).select(range(min(len(chats), MAX_STEPS * BATCH_SIZE * GRADIENT_ACCUMULATION)))
tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token


def tokenize(row):
    input_ids, labels = [tokenizer.bos_token_id], [-100]  # -100: no loss on this token
    for turn in row["conversation"]:
        asked = tokenizer(turn["human"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        said = tokenizer(turn["assistant"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids += asked + said
        labels += [-100] * len(asked) + said
    input_ids, labels = input_ids[:MAX_LENGTH], labels[:MAX_LENGTH]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


train_data = chats.map(tokenize, remove_columns=chats.column_names)
train_data = train_data.filter(lambda row: any(label != -100 for label in row["labels"]))  # an answer left to learn

# The base model in 4 bits (NF4 + double quantization), loaded straight onto the GPU.
quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=COMPUTE_DTYPE)
model = transformers.AutoModelForCausalLM.from_pretrained(
    MODEL, quantization_config=quantization, dtype=COMPUTE_DTYPE,
    device_map={"": 0} if torch.cuda.is_available() else "cpu")
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=GRADIENT_CHECKPOINTING)
lora = LoraConfig(task_type="CAUSAL_LM", r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                  target_modules="all-linear")  # every linear layer of the blocks, not the output head
model = get_peft_model(model, lora)
model.print_trainable_parameters()

args = transformers.TrainingArguments(
    output_dir=OUTPUT_DIR, max_steps=MAX_STEPS, per_device_train_batch_size=BATCH_SIZE,
    gradient_accumulation_steps=GRADIENT_ACCUMULATION, learning_rate=LEARNING_RATE,
    lr_scheduler_type="constant",  # the QLoRA repository's schedule: "constant a bit better than cosine"
    optim="paged_adamw_32bit", max_grad_norm=0.3, weight_decay=0.0,  # QLoRA: paged AdamW, gradients clipped at 0.3
    activation_checkpointing=GRADIENT_CHECKPOINTING, bf16=COMPUTE_DTYPE == torch.bfloat16,
    fp16=COMPUTE_DTYPE == torch.float16, use_cpu=not torch.cuda.is_available(),
    logging_steps=10, logging_first_step=True, save_strategy="steps", save_steps=SAVE_STEPS, save_total_limit=2,
    seed=SEED, data_seed=SEED, report_to="none", dataloader_num_workers=0)
collate = transformers.DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
trainer = transformers.Trainer(model=model, args=args, train_dataset=train_data, data_collator=collate)


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


resume = last_complete_checkpoint(OUTPUT_DIR)
print(f"resuming from {resume}" if resume else f"starting: {len(train_data)} conversations, {MAX_STEPS} steps")
trainer.train(resume_from_checkpoint=resume)
model.save_pretrained(OUTPUT_DIR)  # the adapter only: adapter_config.json + adapter_model.safetensors
tokenizer.save_pretrained(OUTPUT_DIR)
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
print(f"training loss: {losses[0]:.3f} at the start, {losses[-1]:.3f} at the end; adapter saved to {OUTPUT_DIR}")
