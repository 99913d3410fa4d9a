"""DeepSpeed configs, the training script's arguments, and the ZeRO formulas against DeepSpeed's estimator and a run.

Taught in notebooks/07_deepspeed_zero.ipynb (the formulas, the configs) and notebooks/08_multi_gpu_training.ipynb (the
script, the launches). Every config in configs/deepspeed/ goes through DeepSpeed's own
parser after the 🤗 Trainer has filled its "auto" values, exactly as a launch would. Full fine-tuning
(`--use_lora false`) runs under ZeRO-2 and ZeRO-3 on 2 CPU processes (about half a minute), and the bytes each
process held are checked against `helpers.memory.zero_model_states`.
"""
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest

from helpers.env import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "configs" / "deepspeed"
CONFIGS = sorted(CONFIG_DIR.glob("*.json"))
# file -> (stage, optimizer offloaded, parameters offloaded, DeepSpeed's own optimizer)
EXPECTED = {
    "zero2.json": (2, False, False, False),
    "zero2_offload.json": (2, True, False, True),
    "zero3.json": (3, False, False, False),
    "zero3_offload.json": (3, True, True, True),
}


def _fill_and_parse(path, tmp_path, **training_arguments):
    """Fill "auto" as TrainingArguments(deepspeed=...) does, then parse with DeepSpeed's DeepSpeedConfig."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(path), use_cpu=True, report_to="none",
                             **training_arguments)
    hf_config = args.hf_deepspeed_config
    model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=128))  # the course model's width
    hf_config.trainer_config_finalize(args, model, num_training_steps=10)
    filled = json.loads(json.dumps(hf_config.config))
    unset_hf_deepspeed_config()
    return filled, DeepSpeedConfig(filled)


def test_the_course_ships_the_expected_configs():
    assert [p.name for p in CONFIGS] == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_accepted_by_deepspeeds_parser(path, tmp_path):
    filled, parsed = _fill_and_parse(path, tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                     max_grad_norm=0.5)
    stage, offload_optimizer, offload_params, own_optimizer = EXPECTED[path.name]
    assert "auto" not in json.dumps(filled)
    assert parsed.zero_optimization_stage == stage
    assert (parsed.zero_config.offload_optimizer is not None) == offload_optimizer
    assert (parsed.zero_config.offload_param is not None) == offload_params
    assert (parsed.optimizer_name is not None) == own_optimizer  # offload needs DeepSpeed's CPU Adam
    # "auto" took the Trainer's values: 1 process x 4 x 2, clipping = max_grad_norm, fp32 on CPU
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (8, 4, 2)
    assert parsed.gradient_clipping == 0.5
    assert filled["fp16"]["enabled"] is False and filled["bf16"]["enabled"] is False
    if stage == 3:
        assert filled["zero_optimization"]["reduce_bucket_size"] == 128 * 128  # "auto" = hidden_size**2
        assert filled["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_all_configs_share_the_seeds_precision_and_batch_fields():
    seed = json.loads((CONFIG_DIR / "zero2.json").read_text())
    for path in CONFIGS:
        config = json.loads(path.read_text())
        for key in ("fp16", "bf16", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size",
                    "train_micro_batch_size_per_gpu"):
            assert config[key] == seed[key], (path.name, key)


def test_the_seeds_min_loss_scale_is_rejected(tmp_path):
    """The training kit's file had min_loss_scale 1e-10; DeepSpeed 0.19 requires an integer (lesson 07)."""
    from pydantic import ValidationError

    config = json.loads((CONFIG_DIR / "zero2.json").read_text())
    config["fp16"]["min_loss_scale"] = 1e-10
    path = tmp_path / "kit.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValidationError, match="min_loss_scale"):
        _fill_and_parse(path, tmp_path)


def test_deepspeed_checks_the_global_batch(tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig

    filled, _ = _fill_and_parse(CONFIG_DIR / "zero2.json", tmp_path, per_device_train_batch_size=4)
    filled["train_batch_size"] = 16  # what 2 devices x 4 x 2 would need, but this is 1 process x 4 x 1
    with pytest.raises(AssertionError, match="train_batch_size"):
        DeepSpeedConfig(filled)


# --- the ZeRO formulas (helpers.memory) against DeepSpeed's estimator ---------------------------------
@pytest.mark.parametrize("devices", [1, 2, 8, 64])
def test_zero_formulas_match_deepspeeds_estimator_up_to_its_documented_extras(devices):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from helpers.memory import zero_model_states

    psi, largest = 7_000_000_000, 262_144_000  # a 7B model with a 32000 x 8192 embedding
    ds2 = estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=devices, cpu_offload=False)[1]
    ds2_offload = estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=devices, cpu_offload=True)[1]
    ds3 = estimate_zero3_model_states_mem_needs(psi, largest, num_gpus_per_node=devices, cpu_offload=False)[1]
    ds3_offload = estimate_zero3_model_states_mem_needs(psi, largest, num_gpus_per_node=devices)[1]
    ours = lambda **kw: zero_model_states(psi, num_devices=devices, **kw)["total"]  # noqa: E731
    # DeepSpeed adds an fp32 gradient shard (4 bytes/param/N); for stage 3 it uses 18 bytes/param/N for
    # everything sharded and adds an fp32 buffer of the largest layer.
    assert abs(ds2 - (ours(stage=2) + 4 * psi / devices)) <= 1
    assert ds2_offload == ours(stage=2, offload_optimizer=True) == 2 * psi
    assert abs(ds3 - (ours(stage=3) + 2 * psi / devices + 4 * largest)) <= 1
    assert ds3_offload == ours(stage=3, offload_optimizer=True, offload_params=True) + 4 * largest


def test_only_stage_3_fits_llama_65b_full_finetuning_on_80gb_devices():
    """Notebook 07, section 1: stages 0-2 never fit 65B on 80 GB devices; stages 1-2 stay above their floor."""
    from helpers.memory import count_parameters_from_config, zero_model_states

    psi = count_parameters_from_config("huggyllama/llama-65b")["total"]
    fits = {stage: [n for n in (2**i for i in range(13))
                    if zero_model_states(psi, stage=stage, num_devices=n)["total"] <= 80e9] for stage in range(4)}
    assert fits[3] and not fits[0] and not fits[1] and not fits[2]
    assert zero_model_states(psi, stage=1, num_devices=4096)["total"] > 4 * psi  # fp16 weights + gradients, replicated
    assert zero_model_states(psi, stage=2, num_devices=4096)["total"] > 2 * psi  # fp16 weights, replicated


def test_with_lora_zero2_shards_little_and_zero3_divides_the_frozen_weights():
    """Notebook 07, section 1: LLaMA-7B, fp16, LoRA r=8, 8 devices."""
    from helpers.memory import estimate_memory

    def states(stage):
        estimate = estimate_memory("huggyllama/llama-7b", weights="fp16", method="lora", lora_r=8, zero_stage=stage,
                                   num_devices=8, batch_size=1, seq_len=512)
        return {k: estimate.components[k] for k in ("weights", "adapter", "gradients", "optimizer")}

    zero, two, three = states(0), states(2), states(3)
    assert 0 < 1 - sum(two.values()) / sum(zero.values()) < 0.02  # LoRA's trainable states: little to shard
    assert three["weights"] * 8 == pytest.approx(zero["weights"], abs=1e-3)


def test_deepspeed_counts_a_live_model_as_the_course_counts_its_config():
    """The notebook asks DeepSpeed's estimator about Pythia-70m's shape with the course's parameter count."""
    import torch
    import transformers
    from deepspeed.runtime.zero.stage3 import model_to_params

    from helpers.memory import count_parameters_from_config

    config = transformers.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=256, vocab_size=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    # A live model: DeepSpeed tells tensors apart by address, and meta tensors all have the same one.
    total, largest = model_to_params(transformers.GPTNeoXForCausalLM(config))
    assert total == count_parameters_from_config(config)["total"]
    assert largest == 512 * 64  # an embedding (input or output): the largest layer


# --- helpers.launching: what notebook 08's launches go through ----------------------------------------------
def test_launch_env_gives_each_process_its_share_of_the_cores(monkeypatch):
    import torch

    from helpers.launching import launch_env

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert launch_env(2) == {"OMP_NUM_THREADS": "4", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
                             "CUDA_VISIBLE_DEVICES": ""}
    assert launch_env(16)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # a GPU per process: NCCL, nothing hidden
    assert launch_env(2) == {"OMP_NUM_THREADS": "4", "TOKENIZERS_PARALLELISM": "false"}
    with pytest.raises(ValueError, match="positive integer"):
        launch_env(0)


def test_executable_finds_the_launchers_next_to_this_python():
    from pathlib import Path

    from helpers.launching import executable

    for name in ("torchrun", "deepspeed", "accelerate"):
        assert Path(executable(name)).name == name
    with pytest.raises(FileNotFoundError, match="no-such-launcher is installed neither"):
        executable("no-such-launcher")


def test_launcher_prints_the_command_and_the_summary_and_keeps_the_log(tmp_path, capsys):
    from helpers.launching import Launcher

    launch = Launcher(tmp_path / "logs", env={"COURSE_TEST_VALUE": "42"})
    script = "import os; print('noise'); print('[train_lora] world size 1, ' + os.environ['COURSE_TEST_VALUE'])"
    seconds = launch("ok", [sys.executable, "-c", script, "two words"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"$ {launch.commands['ok']}"
    assert launch.commands["ok"].startswith(f"{os.path.basename(sys.executable)} -c ")
    assert launch.commands["ok"].endswith(" 'two words'")  # quoted as a shell needs it
    assert printed[1] == "  world size 1, 42"  # the script's summary line, its prefix removed; no noise
    assert printed[2].endswith(f"log in {tmp_path / 'logs' / 'ok.log'}") and seconds >= 0
    assert (tmp_path / "logs" / "ok.log").read_text().splitlines() == ["noise", "[train_lora] world size 1, 42"]
    launch("shown", [sys.executable, "-c", "pass"], show="python -c pass")
    assert launch.commands["shown"] == "python -c pass"


def test_launcher_raises_with_the_end_of_the_log_when_the_command_fails(tmp_path, capsys):
    from helpers.launching import Launcher

    launch = Launcher(tmp_path)
    with pytest.raises(RuntimeError, match="bad failed with exit code 3; the whole log: .*bad.log"):
        launch("bad", [sys.executable, "-c", "import sys; print('what went wrong'); sys.exit(3)"])
    assert "what went wrong" in capsys.readouterr().out


def test_the_training_script_does_not_import_notebook_plumbing():
    source = (REPO_ROOT / "scripts" / "train_lora.py").read_text()
    assert "helpers.launching" not in source and "from helpers import launching" not in source


# --- scripts/train_lora.py: --help and argument errors --------------------------------------------------
@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_lora", REPO_ROOT / "scripts" / "train_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_lists_the_launch_relevant_flags(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--deepspeed", "--per_device_train_batch_size", "--gradient_accumulation_steps",
                 "--ddp_find_unused_parameters", "--local_rank", "--output_dir", "--use_lora"):
        assert flag in text


@pytest.mark.parametrize("argv, message", [
    ([], "--output_dir"),
    (["--output_dir", "x", "--max_steps", "0"], "--max_steps must be a positive integer, got 0"),
    (["--output_dir", "x", "--per_device_train_batch_size", "-1"], "--per_device_train_batch_size must be a positive"),
    (["--output_dir", "x", "--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
    (["--output_dir", "x", "--fp16", "--bf16"], "--fp16 and --bf16 exclude each other"),
    (["--output_dir", "x", "--deepspeed", "configs/deepspeed/zero4.json"], "the course ships configs/deepspeed/zero2.json"),
    (["--output_dir", "x", "--dataset", "nope"], "--dataset 'nope' is unknown; known:"),
    (["--output_dir", "x", "--dataset", "conversations"], "has format 'conversation'"),
    (["--output_dir", "x", "--ddp_find_unused_parameters", "maybe"], "invalid choice"),
    (["--output_dir", "x", "--use_lora", "maybe"], "invalid choice"),
    (["--output_dir", "x", "--learning_rate", "0"], "--learning_rate must be positive, got 0.0"),
])
def test_bad_arguments_fail_with_a_clear_message(script, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_deepspeed_file_that_is_not_a_zero_config_is_refused(script, capsys, tmp_path):
    bad_json, no_zero = tmp_path / "bad.json", tmp_path / "nozero.json"
    bad_json.write_text("{not json")
    no_zero.write_text(json.dumps({"train_batch_size": "auto"}))
    for path, message in ((bad_json, "is not valid JSON"), (no_zero, "has no 'zero_optimization' section")):
        with pytest.raises(SystemExit):
            script.main(["--output_dir", str(tmp_path), "--deepspeed", str(path)])
        assert message in capsys.readouterr().err


def test_ddp_find_unused_parameters_accepts_the_trainers_spelling(script):
    args = script.build_parser().parse_args(["--output_dir", "x", "--ddp_find_unused_parameters", "False"])
    assert args.ddp_find_unused_parameters == "false"


@pytest.mark.parametrize("name, world_size, engine", [
    ("zero2.json", 2, "DeepSpeed ZeRO-2"), ("zero3_offload.json", 2, "DeepSpeed ZeRO-3"),
    (None, 2, "DDP"), (None, 1, "single process")])
def test_engine_names_what_runs_the_loop(script, name, world_size, engine):
    assert script.engine(str(CONFIG_DIR / name) if name else None, world_size) == engine


# --- full fine-tuning on two CPU processes (notebook 08): what each rank holds, against the formula -------
STANDIN = REPO_ROOT / "models" / "tiny-neox-standin"  # the course's 2.2M-parameter GPT-NeoX, in the repository


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """`--use_lora false` under ZeRO-2 and ZeRO-3 on 2 processes (torchrun, gloo), 3 steps: the two train logs."""
    from helpers.env import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # DeepSpeed builds its CPU collectives op on first use; build it here once rather than in both ranks at once.
    subprocess.run([sys.executable, "-c", "from deepspeed.accelerator import get_accelerator; "
                    "get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)"],
                   env=env, check=True, capture_output=True, timeout=600)
    logs = {}
    for stage in (2, 3):
        out = tmp_path_factory.mktemp(f"zero{stage}_full")
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             "scripts/train_lora.py", "--use_lora", "false", "--deepspeed", f"configs/deepspeed/zero{stage}.json",
             "--model_name_or_path", str(STANDIN), "--max_steps", "3", "--per_device_train_batch_size", "2",
             "--max_train_samples", "16", "--output_dir", str(out)],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        logs[stage] = json.loads((out / "train_log.json").read_text())
        logs[stage]["output_dir"] = out
    return logs


@pytest.mark.parametrize("stage", [2, 3])
def test_full_finetuning_per_process_model_states_match_the_zero_formula(full_runs, stage):
    from helpers.memory import zero_model_states

    log = full_runs[stage]
    psi = log["total_parameters"]
    assert log["method"] == "full" and log["engine"] == f"DeepSpeed ZeRO-{stage}" and log["world_size"] == 2
    assert log["trainable_parameters"] == psi > 2_000_000  # every weight trains
    # fp32 on a CPU: 4-byte weights and gradients; K = 12 (a 4-byte fp32 master copy and Adam's two 4-byte moments).
    expected = zero_model_states(psi, stage=stage, num_devices=2, param_bytes=4, grad_bytes=4, k=12)
    assert len(log["model_states"]) == 2
    for rank in log["model_states"]:
        assert rank["dtype"] == "float32"
        # DeepSpeed pads each rank's partition to an alignment boundary; on this model it came out exact.
        for part in ("params", "gradients", "optimizer", "total"):
            measured = rank["parameters" if part == "params" else part]
            assert abs(measured - expected[part]) <= 0.01 * expected[part], (part, measured, expected[part])
        assert rank["master_copy"] == pytest.approx(4 * psi / 2, rel=0.01)  # a third of K: the master weights
    assert (log["output_dir"] / "model.safetensors").is_file()  # the whole model (gathered from the shards under ZeRO-3)


def test_zero3_shards_the_parameters_that_zero2_replicates(full_runs):
    two, three = (full_runs[s]["model_states"][0] for s in (2, 3))
    assert three["parameters"] == pytest.approx(two["parameters"] / 2, rel=0.01)  # Psi/N instead of Psi
    assert three["gradients"] == pytest.approx(two["gradients"], rel=0.01)        # both shard the gradients ...
    assert three["optimizer"] == pytest.approx(two["optimizer"], rel=0.01)        # ... and the optimizer states
    # The same arithmetic, sharded differently: the same losses step by step.
    assert full_runs[2]["losses"] == pytest.approx(full_runs[3]["losses"], abs=1e-4)
