# recipes/10_dpo.py: DPO with LoRA on bloom-7b1, from (prompt, chosen, rejected) pairs, with TRL's DPOTrainer.
# Run on one GPU from the course's root: python recipes/10_dpo.py (it resumes by itself if stopped).
# Needs: an A100 (40 or 80 GB) or an L4 24 GB in bf16; a T4 16 GB does not hold bloom-7b1's 14 GB of fp16
# weights plus the step (notebook 10's fit check prints the prediction for each GPU).
# Data: the seed's reward-model pairs (ChatGLM Efficient Tuning's comparison_gpt4_zh, CC BY-NC 4.0) are not on the
# Hub; download comparison_gpt4_data_zh.json from https://github.com/hiyouga/ChatGLM-Efficient-Tuning/tree/main/data
# into data/ (SHA-1 b99a41c1c864019d9b0c07dbcd5df0560cf33ce0). The course's data/preference_pairs.jsonl also works.
# Taught in notebooks/10_dpo_and_grpo.ipynb (DPO beside GRPO and PPO); theory in lessons/10_dpo_and_grpo.md.
import json
import os
import re

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import DPOConfig, DPOTrainer

MODEL = "bigscience/bloom-7b1"
DATA = "data/comparison_gpt4_data_zh.json"
MAX_STEPS = 1000  # x 16 pairs per step; one epoch (the seed's --num_train_epochs 1.0) is rows / 16
OUTPUT_DIR = "outputs/recipe-10-dpo"
MAX_LENGTH = 512  # tokens of prompt + reply; longer pairs are cut at the end
BATCH_SIZE = 2  # pairs per device (each is two sequences: chosen and rejected)
GRADIENT_ACCUMULATION = 8  # 16 pairs per optimizer step, as the seed's reward model (4 x 4)
LEARNING_RATE = 5e-5  # for LoRA; the DPO paper trained all weights at 1e-6
BETA = 0.1  # the KL strength of DPO (the DPO paper's value)
LORA_R = 8
LORA_ALPHA = 32
SAVE_STEPS = 200
GRADIENT_CHECKPOINTING = True

set_seed(42)
# bf16 on Ampere and newer, fp16 on older GPUs (T4), fp32 on a CPU.
BF16 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
FP16 = torch.cuda.is_available() and not BF16
dtype = torch.bfloat16 if BF16 else torch.float16 if FP16 else torch.float32

# Preference rows: the course's prompt/chosen/rejected, or the seed's instruction (+ input) with output = [chosen,
# rejected]; the seed appended input to the instruction as it is.
raw = load_dataset("json", data_files=DATA) if DATA.endswith((".json", ".jsonl")) else load_dataset(DATA)


def to_pair(row):
    if "output" in row:
        return {"prompt": row["instruction"] + (row.get("input") or ""),
                "chosen": row["output"][0], "rejected": row["output"][1]}
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


pairs = raw["train"].map(to_pair, remove_columns=raw["train"].column_names)

tokenizer = AutoTokenizer.from_pretrained(MODEL)
policy = AutoModelForCausalLM.from_pretrained(
    MODEL, dtype=dtype, device_map={"": 0} if torch.cuda.is_available() else "cpu")
# With a peft_config and no ref_model, the reference is this same network with the adapter switched off.
lora = LoraConfig(task_type="CAUSAL_LM", r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear")
args = DPOConfig(
    output_dir=OUTPUT_DIR, max_steps=MAX_STEPS, per_device_train_batch_size=BATCH_SIZE,
    gradient_accumulation_steps=GRADIENT_ACCUMULATION, learning_rate=LEARNING_RATE, lr_scheduler_type="cosine",
    beta=BETA, max_length=MAX_LENGTH, gradient_checkpointing=GRADIENT_CHECKPOINTING,
    bf16=BF16, fp16=FP16, use_cpu=not torch.cuda.is_available(), logging_steps=max(1, MAX_STEPS // 100),
    save_steps=SAVE_STEPS, save_total_limit=2, disable_tqdm=False, report_to="none", seed=42)
trainer = DPOTrainer(model=policy, args=args, processing_class=tokenizer, train_dataset=pairs, peft_config=lora)


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
print(f"resuming from {resume}" if resume else "starting from the base model")
trainer.train(resume_from_checkpoint=resume)
trainer.save_model(OUTPUT_DIR)  # the LoRA adapter
tokenizer.save_pretrained(OUTPUT_DIR)

# Training starts at policy = reference: loss ln 2 = 0.693, margin 0. The margin is beta * (log-ratio of the chosen
# reply - log-ratio of the rejected one) against the reference; it should grow as the loss falls.
logs = [entry for entry in trainer.state.log_history if "loss" in entry]
print(f"DPO loss {logs[0]['loss']:.4f} -> {logs[-1]['loss']:.4f}, reward margin (chosen - rejected) "
      f"{logs[0]['rewards/margins']:.4f} -> {logs[-1]['rewards/margins']:.4f} after {trainer.state.global_step} steps")
