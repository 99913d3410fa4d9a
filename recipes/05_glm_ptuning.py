# recipes/05_glm_ptuning.py: P-Tuning v2 (ChatGLM's recipe) or LoRA on GLM-4-9B-Chat, loss on the answer only.
# Run it on a GPU: `python recipes/05_glm_ptuning.py` (pip install torch transformers peft datasets; the course's
# pyproject.toml has them). GPU profile: L4 (24 GB) or larger, not a T4: the 9B model stays in 16 bits (notebook 05's
# fit check predicts its peak on every profile). THUDM/glm-4-9b-chat-hf is GLM-4 converted for transformers
# (GlmForCausalLM): no trust_remote_code. Taught in notebooks/05_ptuning_v2.ipynb: P-Tuning v2, ChatGLM2's
# own recipe, and why `generate` needs helpers.tuning.repair_prefix_generation to see a prefix (transformers >= 5.23).
# Run it again with the same OUTPUT_DIR and it resumes from the last complete checkpoint.
import json
import os
import re

import torch
from datasets import load_dataset
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                          TrainingArguments, set_seed)

MODEL = "THUDM/glm-4-9b-chat-hf"   # GLM-4-9B-Chat for transformers >= 4.46 (model_type "glm", 2 key/value heads)
DATA = "PromptCBLUE/train.json"    # PromptCBLUE's train split: not on the Hub, download it (see DATA's check below)
TASK = "CHIP-CTC"                  # the PromptCBLUE task kept (the course's classification, data/dataset_info.json)
MAX_STEPS = 3000                   # ChatGLM2-6B ptuning/train.sh
OUTPUT_DIR = "outputs/recipe-05-glm-ptuning"
METHOD = "p-tuning-v2"             # or "lora"
PRE_SEQ_LEN = 128                  # train.sh PRE_SEQ_LEN
PREFIX_PROJECTION = False          # ptuning/arguments.py default: the prefix table itself is learned
LORA_R = 8                         # ChatGLM Efficient Tuning's table: r=8 (here on every linear layer, as in QLoRA)
LORA_ALPHA = 16
MAX_LENGTH = 256                   # tokens per example, prompt + answer (train.sh: 64 + 128 for its ADGEN data)
BATCH_SIZE = 1                     # train.sh
GRADIENT_ACCUMULATION = 16         # train.sh
LEARNING_RATE = 2e-2               # train.sh LR, for P-Tuning v2
LORA_LEARNING_RATE = 2e-4          # for METHOD = "lora" (ChatGLM Efficient Tuning: 2e-4 to 5e-5)
SAVE_STEPS = 1000                  # train.sh
GRADIENT_CHECKPOINTING = False     # peft refuses it with prefix tuning; True saves memory with METHOD = "lora"
SEED = 42

if METHOD not in ("p-tuning-v2", "lora"):
    raise ValueError(f'METHOD must be "p-tuning-v2" or "lora", got {METHOD!r}')
if GRADIENT_CHECKPOINTING and METHOD == "p-tuning-v2":
    raise ValueError("peft refuses gradient checkpointing with prefix tuning: set GRADIENT_CHECKPOINTING = False")
set_seed(SEED)
cuda = torch.cuda.is_available()
bf16 = cuda and torch.cuda.get_device_capability()[0] >= 8   # Ampere or newer; a T4 (7.5) computes in fp16
fp16 = cuda and not bf16
dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32

tokenizer = AutoTokenizer.from_pretrained(MODEL)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=dtype, device_map={"": 0} if cuda else "cpu")
if GRADIENT_CHECKPOINTING:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
if METHOD == "p-tuning-v2":
    # peft reads num_key_value_heads and head_dim from the config: GLM-4's prefix holds 2 key/value heads of 128
    # per layer (grouped-query attention), PRE_SEQ_LEN x layers x 2 x 256 numbers, as ChatGLM2's own PrefixEncoder.
    peft_config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PRE_SEQ_LEN,
                                     prefix_projection=PREFIX_PROJECTION)
else:
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear")
model = get_peft_model(model, peft_config)   # the trainable part in fp32, the frozen model in `dtype`
model.print_trainable_parameters()

if DATA.endswith((".json", ".jsonl")):
    if not os.path.isfile(DATA):
        raise FileNotFoundError(f"{DATA} not found. PromptCBLUE is not on the Hugging Face Hub: register and download "
                                "it from https://tianchi.aliyun.com/competition/entrance/532084/introduction "
                                "(https://github.com/michael-wzhu/PromptCBLUE), then set DATA to its train.json")
    rows = load_dataset("json", data_files=DATA, split="train")
else:
    rows = load_dataset(DATA, split="train")
if "task_dataset" in rows.column_names:
    rows = rows.filter(lambda row: row["task_dataset"] == TASK)


def encode(row):
    """input_ids = prompt + answer + EOS; labels -100 on the prompt, so the loss is on the answer only."""
    prompt = row["input"]
    if tokenizer.chat_template:   # a chat model answers in its chat format (ChatGLM2's main.py: build_prompt)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(row["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + answer_ids, "attention_mask": [1] * (len(prompt_ids) + len(answer_ids)),
            "labels": [-100] * len(prompt_ids) + answer_ids}


train = rows.map(encode, remove_columns=rows.column_names)
train = train.filter(lambda example: len(example["input_ids"]) <= MAX_LENGTH)   # never cut a question short
print(f"{len(train)} of {len(rows)} {TASK} examples fit in MAX_LENGTH = {MAX_LENGTH} tokens")


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


class LogLastStep(TrainerCallback):
    """Log the loss at the last step too, so that the final loss is printed whatever logging_steps is."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


args = TrainingArguments(
    output_dir=OUTPUT_DIR, max_steps=MAX_STEPS, per_device_train_batch_size=BATCH_SIZE,
    gradient_accumulation_steps=GRADIENT_ACCUMULATION,
    learning_rate=LEARNING_RATE if METHOD == "p-tuning-v2" else LORA_LEARNING_RATE,
    logging_steps=10, logging_first_step=True, save_strategy="steps", save_steps=SAVE_STEPS,
    bf16=bf16, fp16=fp16, use_cpu=not cuda, seed=SEED, data_seed=SEED, report_to="none",
    remove_unused_columns=False)
trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                  data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                  callbacks=[LogLastStep()])
resume = last_complete_checkpoint(OUTPUT_DIR)
print(f"resuming from {resume}" if resume else f"starting; checkpoints every {SAVE_STEPS} steps in {OUTPUT_DIR}")
trainer.train(resume_from_checkpoint=resume)
trainer.save_model(OUTPUT_DIR)   # the prefix table (or the LoRA adapter) and the tokenizer, as safetensors
logged = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
print(f"loss {logged[0][1]:.4f} at step {logged[0][0]}, {logged[-1][1]:.4f} at step {logged[-1][0]}; "
      f"{METHOD} saved to {OUTPUT_DIR}")
