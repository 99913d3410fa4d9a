"""Helpers for the course notebooks: each function names the notebook that teaches it. No import-time side effects.

The modules form layers, read from the bottom up; a module imports only from modules listed before it
(tests/test_hygiene.py checks every import, at the top of a file or inside a function):

    environment  env            machine, seeds, output folders, test size
    data         data           the registry, reading and validating files into 🤗 datasets
    prompts      prompts        prompt formats, tokenization with the loss on responses, collation
    models       quantization   NF4 / compute dtypes
                 models         which model loads (the real one or the stand-in), loading, LoRA targets
                 standin        building the stand-in
                 memory         the memory model (from a config; only the LoRA target table from models)
                 checks         lesson checks (strict only on the stand-in, so they ask models)
    training     checkpoints    complete-checkpoint markers
                 tuning         the Trainer recipe for every method, measured
                 launching      running a script on several processes: launcher, environment, log (notebook 08)
                 run_cache      train once, reuse the saved run (notebooks 06 and 11)
                 export         merging and loading for inference; answer losses; reusing notebook 12's adapter in 13
    generation   metrics        BLEU-4 / ROUGE on text (no model)
                 generation     batched generation, the predictions file, accuracy, perplexity
                 rewards        reward functions; training and reading the reward model
                 ppo            PPO's pieces; notebook 10's start (09's models, loaded or trained again)
    serving      chat           the chat loop
                 serving        the OpenAI-compatible server
"""

LAYERS = (
    ("environment", ("env",)),
    ("data", ("data",)),
    ("prompts", ("prompts",)),
    ("models", ("quantization", "models", "standin", "memory", "checks")),
    ("training", ("checkpoints", "tuning", "launching", "run_cache", "export")),
    ("generation", ("metrics", "generation", "rewards", "ppo")),
    ("serving", ("chat", "serving")),
)
