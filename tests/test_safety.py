"""Safe by default: no code from a model repository runs, weights are safetensors (nothing is unpickled
without torch's restricted loader), no token is written into the course, and a token is only ever read
from the environment, by the Hub library, when the Hub is contacted.

The static checks read the course's own code: helpers/, scripts/, benchmarks/ and every notebook.
The dynamic ones build booby-trapped files (a model folder with custom code, a pickle that runs a
command when loaded) and check that loading them fails without running anything.
"""
from __future__ import annotations

import ast
import builtins
import json
import pickle
import re
import socket
from pathlib import Path

import pytest
import torch

from helpers import models
from helpers.env import REPO_ROOT, environment_report
from helpers.models import load_model, load_tokenizer

from _train_for_kill import train  # tests/_train_for_kill.py: a tiny LoRA run; the model is conftest's `tiny_neox`

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
SOURCES = sorted(p for folder in ("helpers", "scripts", "benchmarks") for p in (REPO_ROOT / folder).rglob("*.py"))
TEXT_FILES = sorted({*SOURCES, *NOTEBOOKS, *(REPO_ROOT / "lessons").glob("*.md"), *REPO_ROOT.glob("*.md"),
                     *REPO_ROOT.glob("*.toml"), *REPO_ROOT.glob("*.yml"), *(REPO_ROOT / "configs").rglob("*.json"),
                     *(REPO_ROOT / "tests").glob("*.py")})


def _notebook_code(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    # IPython lines (!shell, %magic) are not Python; blank them so that ast can parse the rest.
    return ["\n".join("" if line.lstrip().startswith(("!", "%")) else line for line in "".join(c["source"]).split("\n"))
            for c in cells if c["cell_type"] == "code"]


def _trees():
    for path in SOURCES:
        yield path.relative_to(REPO_ROOT).as_posix(), ast.parse(path.read_text())
    for path in NOTEBOOKS:
        for i, code in enumerate(_notebook_code(path)):
            yield f"{path.relative_to(REPO_ROOT).as_posix()} cell {i}", ast.parse(code)


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func) -> str:
    return ast.unparse(func)


def _keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_false(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


# --- trust_remote_code ------------------------------------------------------------------------------------

def test_trust_remote_code_is_never_switched_on_without_a_pinned_revision():
    offending = []
    for where, tree in _trees():
        for call in _calls(tree):
            trust = _keyword(call, "trust_remote_code")
            if trust is None or _is_false(trust) or (isinstance(trust, ast.Name) and trust.id == "trust_remote_code"):
                continue  # off, or helpers.models passing the caller's choice through (checked below)
            revision = _keyword(call, "revision")
            pinned = isinstance(revision, ast.Constant) and re.fullmatch(r"[0-9a-f]{40}", str(revision.value))
            if not (where.startswith("notebooks/") and pinned):
                offending.append(f"{where}: {ast.unparse(call)[:120]}")
    assert not offending, "trust_remote_code on outside a notebook recipe with revision='<commit>':\n" + "\n".join(offending)


def _remote_code_folder(folder: Path, sentinel: Path) -> Path:
    """The tiny model's `folder` (real safetensors weights, so only the custom code is in the way), made into one
    whose config asks for its own Python code; running that code writes `sentinel`."""
    (folder / "config.json").write_text(json.dumps({
        "model_type": "trap", "architectures": ["TrapModel"],
        "auto_map": {"AutoConfig": "configuration_trap.TrapConfig", "AutoModelForCausalLM": "modeling_trap.TrapModel",
                     "AutoTokenizer": ["tokenization_trap.TrapTokenizer", None]}}))
    code = f"open({str(sentinel)!r}, 'w').write('the repository code ran')\n"
    for name in ("configuration_trap.py", "modeling_trap.py", "tokenization_trap.py"):
        (folder / name).write_text(code)
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_trap.TrapTokenizer", None]}}))
    return folder


def test_a_model_with_custom_code_is_refused_without_running_or_asking(tmp_path, monkeypatch, tiny_neox):
    sentinel = tmp_path / "ran.txt"
    folder = _remote_code_folder(tiny_neox(tmp_path / "trap"), sentinel)

    def no_prompt(*args, **kwargs):
        raise AssertionError("transformers asked whether to run the repository's code; the course must never ask")

    monkeypatch.setattr(builtins, "input", no_prompt)
    refused = "ships its own Python code .* does not run code from a model repository.* trust_remote_code=True with revision="
    with pytest.raises(ValueError, match=refused):
        load_model(str(folder), verbose=False)
    with pytest.raises(ValueError, match=refused):
        load_tokenizer(str(folder))
    assert not sentinel.exists()


@pytest.mark.parametrize("revision", [None, "main", "v1.0"])
def test_trusting_remote_code_needs_a_commit_hash(monkeypatch, revision):
    monkeypatch.setattr(models, "_cached", lambda name, revision=None: True)  # as if the model were in the cache
    with pytest.raises(ValueError, match="pin the commit you read with revision='<40-hex commit hash>'"):
        load_model("THUDM/chatglm2-6b", trust_remote_code=True, revision=revision, verbose=False)
    with pytest.raises(ValueError, match="pin the commit"):
        load_tokenizer("THUDM/chatglm2-6b", trust_remote_code=True, revision=revision)


def test_helpers_pass_trust_remote_code_false_explicitly(tmp_path, monkeypatch, tiny_neox):
    """False, not the library default None: None makes transformers prompt (and wait) in an interactive session."""
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    load_model(str(tiny_neox(tmp_path / "m")), verbose=False)
    assert seen and seen[0]["trust_remote_code"] is False and seen[0]["use_safetensors"] is True


# --- safetensors, never an unrestricted unpickle ----------------------------------------------------------

class _Trap:
    """Unpickling this calls `open(path, "w")`: what a malicious checkpoint would do with os.system."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_only_weights_are_refused_unopened(tmp_path, tiny_neox):
    folder = tiny_neox(tmp_path / "model")
    (folder / "model.safetensors").unlink()
    sentinel = tmp_path / "unpickled.txt"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weights": _Trap(sentinel)}, f)
    with pytest.raises(OSError, match=r"only as pickle files \(pytorch_model.bin\); the course loads safetensors only"):
        load_model(str(folder), verbose=False)
    assert not sentinel.exists()


def test_saved_weights_are_safetensors_and_checkpoint_pickles_load_restricted(tmp_path, monkeypatch, tiny_neox):
    """A LoRA run through the Trainer: the adapter is safetensors; the optimizer, scheduler and random states
    (torch pickles) are read back only with torch's weights-only loader on resume; a booby-trapped
    optimizer.pt is refused without running."""
    base = tiny_neox(tmp_path / "base")
    assert sorted(p.name for p in base.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    out = tmp_path / "run"
    train(base, out, max_steps=2, save_steps=1)
    checkpoint = out / "checkpoint-1"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not list(checkpoint.glob("adapter_model.bin")) and not list(checkpoint.glob("pytorch_model*.bin"))

    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    train(base, tmp_path / "resumed", max_steps=2, save_steps=1, resume=checkpoint)
    assert loads and all(flag is True for flag in loads), loads  # never the unrestricted unpickler

    from helpers.checkpoints import mark_complete

    sentinel = tmp_path / "unpickled.txt"
    with open(checkpoint / "optimizer.pt", "wb") as f:
        pickle.dump({"state": _Trap(sentinel)}, f)
    mark_complete(checkpoint)  # even a checkpoint that looks complete
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(base, tmp_path / "trapped", max_steps=2, save_steps=1, resume=checkpoint)
    assert not sentinel.exists()


# Findings in files this test's author does not own, reported to the lead for routing. Each entry must
# still be found (so that a fixed file makes this list shrink), and nothing else may be.
KNOWN_GAPS: set[str] = set()  # notebook 08 now reads DeepSpeed's shards with weights_only=True + safe_globals


def test_no_unrestricted_unpickling_or_pickle_saving_in_the_course():
    offending = []
    for where, tree in _trees():
        for call in _calls(tree):
            name = _name(call.func)
            if name in ("pickle.load", "pickle.loads", "joblib.load", "dill.load", "cloudpickle.load"):
                offending.append(f"{where}: {name}")
            if name.endswith("torch.load") or name == "torch.load":
                if not _is_true(_keyword(call, "weights_only")):
                    offending.append(f"{where}: torch.load without weights_only=True")
            if name.endswith("np.load") or name.endswith("numpy.load"):
                if _is_true(_keyword(call, "allow_pickle")):
                    offending.append(f"{where}: np.load(allow_pickle=True)")
            for flag in ("safe_serialization", "use_safetensors"):
                if _is_false(_keyword(call, flag)):
                    offending.append(f"{where}: {flag}=False")
    assert not set(offending) - KNOWN_GAPS, "\n".join(sorted(set(offending) - KNOWN_GAPS))
    assert KNOWN_GAPS <= set(offending), f"fixed, remove from KNOWN_GAPS: {sorted(KNOWN_GAPS - set(offending))}"


# --- tokens -------------------------------------------------------------------------------------------------

TOKEN_PATTERNS = {
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}",
    "OpenAI key": r"\bsk-[A-Za-z0-9_-]{20,}",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{30,}",
    "token typed into code": r"""\b(token|api_key|use_auth_token|hf_token)\s*=\s*["'][A-Za-z0-9_\-]{16,}["']""",
}


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_no_token_is_written_into_the_course(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    if path == Path(__file__):
        text = text.split("TOKEN_PATTERNS = {", 1)[0]  # the patterns themselves
    for what, pattern in TOKEN_PATTERNS.items():
        assert not re.search(pattern, text), f"{path.name}: a {what} is written in the file"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_never_log_in_interactively_or_with_a_literal(path):
    for i, code in enumerate(_notebook_code(path)):
        for call in _calls(ast.parse(code)):
            name = _name(call.func).split(".")[-1]
            assert name != "notebook_login", f"{path.name} cell {i}: notebook_login() blocks a headless run"
            if name in ("login", "HfApi", "HfFolder.save_token", "save_token"):
                literals = [a for a in [*call.args, *(k.value for k in call.keywords)] if isinstance(a, ast.Constant)
                            and isinstance(a.value, str)]
                assert not literals, f"{path.name} cell {i}: {ast.unparse(call)} takes a token literal"


def _environment_reads(tree):
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Subscript) and _name(node.value) in ("os.environ", "environ"):
            key = node.slice
        elif isinstance(node, ast.Call) and _name(node.func) in ("os.environ.get", "os.getenv", "environ.get", "getenv"):
            key = node.args[0] if node.args else None
        if key is not None:
            yield key.value if isinstance(key, ast.Constant) else ast.unparse(key)


def test_the_course_never_reads_a_token_itself():
    """huggingface_hub reads HF_TOKEN on its own, and only to send it to the Hub; the course's code never does."""
    secret = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|API_KEY)($|_)")
    found = [f"{where}: {key}" for where, tree in _trees() for key in _environment_reads(tree)
             if isinstance(key, str) and secret.search(key)]
    assert not found, found


def test_a_token_in_the_environment_is_never_printed_or_sent_offline(tmp_path, monkeypatch, capsys, tiny_neox):
    token = "hf_" + "Q" * 34  # a made-up token
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("an offline load tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    report = environment_report(show=True)
    model = load_model(str(tiny_neox(tmp_path / "m")), verbose=True)
    printed = capsys.readouterr()
    assert model is not None and report
    assert token not in printed.out + printed.err + json.dumps(report)
