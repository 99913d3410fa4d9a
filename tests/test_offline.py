"""Offline by default: with no network the course runs on its stand-in and says so; with HF_HUB_OFFLINE=1 and
the real model in the local Hugging Face cache, the real model is used.

The Hub library reads HF_HUB_OFFLINE and its cache location when it is imported, so each situation runs in a
fresh Python process with its own environment, as a learner's kernel would:
- 'no network': HF_HUB_OFFLINE unset, every socket connection refused (as on an air-gapped machine);
- 'cached':     HF_HUB_OFFLINE=1 and HF_HOME pointing at a Hugging Face cache built in tmp_path that holds
                EleutherAI/pythia-70m-deduped, laid out as `huggingface_hub` lays out a download
                (refs/main -> snapshots/<commit>/<file> -> ../../blobs/<sha256>), with the stand-in's
                files as content and a marker in its config.json to tell it from the stand-in folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.env import REPO_ROOT
from helpers.models import DEFAULT_MODEL, STANDIN_DIR, resolve_model

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex name works for a snapshot
MARKER = "course_test_marker"

# What each process does, then prints as one JSON line. It loads through the course's helpers only.
PROBE = r"""
import json, socket, sys
attempts = []
if sys.argv[1] == "no-network":
    def refuse(*args, **kwargs):
        attempts.append(repr(args[:1]))
        raise OSError("Network is unreachable (the test took the network away)")
    socket.create_connection = refuse
    socket.socket.connect = refuse
from helpers.models import load_model, load_tokenizer, resolve_model
choice = resolve_model()
tokenizer = load_tokenizer()
model = load_model()
ids = tokenizer("3 加 4 等于", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print(json.dumps({"standin": choice.standin, "path": choice.path, "reason": choice.reason, "said": str(choice),
                  "marker": getattr(model.config, "course_test_marker", None), "hidden": model.config.hidden_size,
                  "new_tokens": out.shape[1] - ids["input_ids"].shape[1], "attempts": attempts}))
"""


def _fake_hub_cache(hub: Path) -> Path:
    """EleutherAI/pythia-70m-deduped in a Hugging Face cache, with the stand-in's files as its content."""
    repo = hub / f"models--{DEFAULT_MODEL.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for source in sorted(STANDIN_DIR.iterdir()):
        if source.suffix not in (".json", ".safetensors") or source.name == "pretraining.json":
            continue
        data = source.read_bytes()
        if source.name == "config.json":
            data = json.dumps({**json.loads(data), MARKER: "from the cache"}, indent=2).encode()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / source.name).symlink_to(os.path.relpath(blob, snapshot))
    return hub


def _environment(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HOME=str(tmp / "hf-home"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])), **extra)
    return env


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """Both situations, run side by side; {situation: (result, stdout+stderr)}."""
    assert (STANDIN_DIR / "model.safetensors").is_file(), "the stand-in is missing: make standin"
    tmp = tmp_path_factory.mktemp("offline")
    hub = _fake_hub_cache(tmp / "cached" / "hf-home" / "hub")
    runs = {
        "no-network": _environment(tmp / "empty"),
        "cached": _environment(tmp / "cached", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub)),
    }
    procs = {name: subprocess.Popen([sys.executable, "-c", PROBE, name], env=env, cwd=tmp, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for name, env in runs.items()}
    results = {}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}:\n{output[-3000:]}"
        line = next(l for l in reversed(output.splitlines()) if l.startswith("{"))
        results[name] = (json.loads(line), output)
    return results


def test_without_network_the_standin_is_used_and_announced(probes):
    result, output = probes["no-network"]
    assert result["standin"] and Path(result["path"]) == STANDIN_DIR
    assert result["reason"] == "the Hugging Face Hub is not reachable and it is not in the local cache"
    assert "NOT Pythia" in result["said"]
    assert f"Loaded {DEFAULT_MODEL} -> stand-in models/tiny-neox-standin" in output  # what a learner reads
    assert result["new_tokens"] == 3  # and it works: it generates
    assert len(result["attempts"]) == 1, result["attempts"]  # one reachability probe, then nothing but local files


def test_offline_with_the_real_model_cached_the_cached_model_is_used(probes):
    result, output = probes["cached"]
    assert not result["standin"] and result["path"] == DEFAULT_MODEL
    assert result["reason"] == "from the local Hugging Face cache"
    assert result["marker"] == "from the cache"  # the snapshot's config, not the stand-in folder's
    assert f"Loaded {DEFAULT_MODEL} (from the local Hugging Face cache)" in output and "stand-in" not in output
    assert result["new_tokens"] == 3


def test_offline_without_the_cache_says_why_it_uses_the_standin(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    choice = resolve_model()
    assert choice.standin and choice.reason == "HF_HUB_OFFLINE=1 and it is not in the local cache"
    assert str(choice).startswith(f"{DEFAULT_MODEL} -> stand-in models/tiny-neox-standin (HF_HUB_OFFLINE=1")


def _code(path: Path) -> str:
    return "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_load_models_only_through_the_offline_aware_helpers(path):
    """A Hub id handed straight to from_pretrained would fail offline instead of falling back to the stand-in."""
    code = _code(path)
    direct = re.findall(r"""from_pretrained\(\s*(["'][^"']*["']|CONFIG\[["']model_name["']\]|DEFAULT_MODEL)""", code)
    assert not direct, f"{path.name}: from_pretrained({direct[0]}) bypasses helpers.models.resolve_model"
    assert "hf_hub_download" not in code and "snapshot_download" not in code, f"{path.name} downloads at run time"


LOADS_THE_COURSE_MODEL = [p for p in NOTEBOOKS if re.search(r"(load_model|resolve_model|load_for_inference)\(\s*CONFIG",
                                                               _code(p))]


@pytest.mark.parametrize("path", LOADS_THE_COURSE_MODEL, ids=lambda p: p.name)
def test_notebooks_that_load_the_course_model_say_which_model_they_got(path):
    code = _code(path)
    loud = [args for args in re.findall(r"load_model\(([^()]*(?:\([^()]*\))?[^()]*)\)", code) if "verbose=False" not in args]
    printed = re.search(r"""print\((\s*choice\s*[,)]|\s*resolve_model\(|\s*f["'][^"']*\{choice[}!:])""", code)
    assert loud or printed, (f"{path.name} loads the model only with verbose=False: offline, a learner is never "
                             "told that the stand-in replaced the real model (print(resolve_model(...)) once)")
