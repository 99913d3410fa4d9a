"""How far each lesson's result moves between runs: seeds x CPU kernel paths x thread counts.

    python -m benchmarks.robustness                                  # notebooks 02 04 05 06 11, 5 seeds, every path, 1 and 2 threads
    python -m benchmarks.robustness --notebooks 06,11 --seeds 1,2,3 --jobs 2
    python -m benchmarks.robustness --paths                          # list the kernel paths and exit

A result that holds on one CPU and not on another is a knife edge, not a lesson. This script executes the
notebooks themselves (the same cells `make test` runs, at test size, offline, on the stand-in) once per
combination of
  seed          COURSE_SEED, which the notebooks' CONFIG["seed"] reads (helpers.env.course_seed);
  kernel path   which vector instructions PyTorch (ATEN_CPU_CAPABILITY), oneDNN (ONEDNN_MAX_CPU_ISA) and MKL
                (MKL_ENABLE_INSTRUCTIONS) may use. Capping them on a better CPU reproduces the arithmetic of a
                lesser one: "avx2" on an AVX-512 machine is an AVX2-only machine; "generic" is the plainest path;
  threads       OMP_NUM_THREADS (sums split across threads add up in another order).
Every lesson check (helpers.checks.lesson_check) is recorded instead of raised (COURSE_CHECKS_STRICT=0), and
the table gives, per check: runs, mean, min, max of the measured value, the bar, and the worst margin (how far
the worst run stayed on the right side of its bar; negative = it failed). Code-correctness asserts still
raise; a notebook that stops is reported with its error. Each run writes to its own outputs folder, so
cached trainings never leak from one kernel path to another.

Writes <out>/checks.jsonl (every check of every run), <out>/runs.json and <out>/robustness.md (the table),
default out = outputs/robustness/. On 2 cores, --jobs 2 runs two 1-thread runs side by side (2-thread runs
always run alone). Measured times are in the table's header; the full default sweep takes hours there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/robustness.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.env import REPO_ROOT  # noqa: E402

DEFAULT_NOTEBOOKS = ("02", "04", "05", "06", "11")
# name -> (environment, what it means). "best" sets nothing: the machine's own best instructions.
KERNEL_PATHS = {
    "best": ({}, "everything at this CPU's best instructions"),
    "avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
             "an AVX2-only CPU (differs from best only where the CPU has AVX-512)"),
    "aten-default": ({"ATEN_CPU_CAPABILITY": "default"}, "PyTorch's own kernels without vector extensions"),
    "generic": ({"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
                "PyTorch, oneDNN and MKL all on the plainest path"),
}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def available_paths() -> dict[str, str]:
    """The kernel paths that differ on this CPU: avx2 only where the CPU has AVX-512 (else it is 'best')."""
    flags = cpu_flags()
    paths = {}
    for name, (_, meaning) in KERNEL_PATHS.items():
        if name == "avx2" and ("avx2" not in flags or "avx512f" not in flags):
            continue
        paths[name] = meaning
    return paths


def machine() -> str:
    """This machine in a few words, for a table's header."""
    flags = cpu_flags()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{platform.machine()} {os.cpu_count()} cores ({isa})"


def notebook_paths(selection: list[str]) -> list[Path]:
    found = []
    for number in selection:
        matches = sorted((REPO_ROOT / "notebooks").glob(f"{number}_*.ipynb"))
        if len(matches) != 1:
            raise SystemExit(f"--notebooks: no single notebook numbered {number!r} in notebooks/")
        found.append(matches[0])
    return found


def run_environment(path: str, threads: int, seed: int, outputs: Path, log: Path) -> dict[str, str]:
    env = dict(os.environ)
    for variable in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        env.pop(variable, None)
    env.update(KERNEL_PATHS[path][0])
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "COURSE_SEED": str(seed),
                "COURSE_SMOKE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "COURSE_CHECKS_STRICT": "0", "COURSE_CHECKS_LOG": str(log), "COURSE_OUTPUTS": str(outputs),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))})
    return env


def execute_notebook(notebook: Path, env: dict[str, str], timeout: int):
    """Run every cell of a notebook in a fresh kernel with `env`; return (status, seconds, the executed notebook).

    status is "ran", or "error: <the exception's last line>" (a code-correctness assert or a crash).
    Also used by tests/test_online_lane.py.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(notebook.parent)}})
    started = time.perf_counter()
    try:
        client.execute(env=env)
        status = "ran"
    except Exception as error:  # reported, so that a sweep goes on
        status = f"error: {type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
    return status, round(time.perf_counter() - started, 1), nb


def run_one(notebooks: list[Path], path: str, threads: int, seed: int, out: Path, timeout: int) -> dict:
    """Execute the notebooks in order in fresh kernels under one combination; return what happened."""
    name = f"{path}-t{threads}-s{seed}"
    outputs, log = out / "runs" / name, out / "runs" / f"{name}.jsonl"
    outputs.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    record = {"run": name, "path": path, "threads": threads, "seed": seed, "notebooks": {}}
    for notebook in notebooks:
        env = run_environment(path, threads, seed, outputs, log)
        env["COURSE_NOTEBOOK"] = notebook.stem
        status, seconds, _ = execute_notebook(notebook, env, timeout)
        record["notebooks"][notebook.stem] = {"status": status, "seconds": seconds}
        print(f"{name:>24} {notebook.stem:<26} {status[:60]:<60} {record['notebooks'][notebook.stem]['seconds']:>6.1f} s",
              flush=True)
    record["checks"] = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return record


def summarize(records: list[dict]) -> list[dict]:
    rows: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        for check in record["checks"]:
            rows.setdefault((check["notebook"], check["claim"]), []).append({**check, "run": record["run"]})
    table = []
    for (notebook, claim), checks in rows.items():
        values = [c["value"] for c in checks]
        bars = sorted({round(c["bar"], 4) for c in checks})
        worst = min(checks, key=lambda c: c["margin"])
        table.append({"notebook": notebook, "claim": claim, "op": checks[0]["op"], "runs": len(checks),
                      "held": sum(c["held"] for c in checks), "mean": statistics.fmean(values),
                      "sd": statistics.pstdev(values), "min": min(values), "max": max(values),
                      "bar": bars[0] if len(bars) == 1 else f"{bars[0]:.4g}..{bars[-1]:.4g}",
                      "worst margin": worst["margin"], "worst run": worst["run"]})
    return sorted(table, key=lambda r: (r["notebook"], r["claim"]))


def markdown(table: list[dict], records: list[dict], header: str) -> str:
    lines = [header, "", "| notebook | lesson check | op | runs | held | mean ± sd | min | max | bar | worst margin (run) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        bar = r["bar"] if isinstance(r["bar"], str) else f"{r['bar']:.4g}"
        lines.append(f"| {r['notebook'][:2]} | {r['claim']} | {r['op']} | {r['runs']} | {r['held']} | "
                     f"{r['mean']:.4g} ± {r['sd']:.2g} | {r['min']:.4g} | {r['max']:.4g} | {bar} | "
                     f"{r['worst margin']:.4g} ({r['worst run']}) |")
    errors = [(rec["run"], nb, info["status"]) for rec in records for nb, info in rec["notebooks"].items()
              if info["status"] != "ran"]
    if errors:
        lines += ["", "Runs that stopped:", ""] + [f"- {run} {nb}: {status}" for run, nb, status in errors]
    return "\n".join(lines) + "\n"


def summarize_saved(out: Path, notebooks: list[str] | None = None) -> int:
    """The table from every run saved under out/runs (each run's checks are in <run>.jsonl), optionally of some
    notebooks only (their numbers)."""
    records = []
    for log in sorted((out / "runs").glob("*.jsonl")):
        path, threads, seed = log.stem.rsplit("-", 2)
        checks = [json.loads(line) for line in log.read_text().splitlines()]
        if notebooks:
            checks = [c for c in checks if c["notebook"][:2] in notebooks]
        if not checks:
            continue
        records.append({"run": log.stem, "path": path, "threads": int(threads[1:]), "seed": int(seed[1:]),
                        "notebooks": {}, "checks": checks})
    if not records:
        raise SystemExit(f"no runs with lesson checks{' of notebooks ' + ','.join(notebooks) if notebooks else ''} "
                         f"saved under {out / 'runs'}")
    combos = ", ".join(sorted(r["run"] for r in records))
    header = (f"Lesson checks of {len(records)} saved runs at test size ({combos}) on {machine()}. "
              "Generated by `python -m benchmarks.robustness --summarize`.")
    text = markdown(summarize(records), records, header)
    (out / "robustness.md").write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebooks", default=None,
                        help=f"comma-separated numbers, run in order (default {','.join(DEFAULT_NOTEBOOKS)}); "
                             "with --summarize: tabulate only these")
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--paths", nargs="?", const="", default=None,
                        help="comma-separated kernel paths (default: every path that differs on this CPU); "
                             "without a value: list them and exit")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--jobs", type=int, default=1, help="1-thread runs side by side (2 on a 2-core machine)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "robustness")
    parser.add_argument("--summarize", action="store_true",
                        help="run nothing: rebuild the table from the runs already in <out>/runs (an interrupted sweep)")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # the kernels start in notebooks/ and the servers they launch in the repository
    if args.summarize:
        return summarize_saved(args.out, args.notebooks.split(",") if args.notebooks else None)
    args.notebooks = args.notebooks or ",".join(DEFAULT_NOTEBOOKS)

    paths = available_paths()
    if args.paths == "":
        for name, meaning in paths.items():
            print(f"{name:>13}  {meaning}  {KERNEL_PATHS[name][0] or ''}")
        return 0
    chosen = args.paths.split(",") if args.paths else list(paths)
    unknown = [p for p in chosen if p not in KERNEL_PATHS]
    if unknown:
        raise SystemExit(f"--paths: unknown {unknown}; choose from {sorted(KERNEL_PATHS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        raise SystemExit("--seeds and --threads take comma-separated integers") from None
    notebooks = notebook_paths(args.notebooks.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    combos = [(p, t, s) for t in threads for p in chosen for s in seeds]
    started = time.perf_counter()
    records = []
    single = [c for c in combos if c[1] == 1]
    for combo in [c for c in combos if c[1] != 1]:
        records.append(run_one(notebooks, *combo, args.out, args.timeout))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        records += list(pool.map(lambda c: run_one(notebooks, *c, args.out, args.timeout), single))
    minutes = (time.perf_counter() - started) / 60
    import torch

    header = (f"Sweep of notebooks {args.notebooks} at test size: seeds {args.seeds} x kernel paths {','.join(chosen)} "
              f"x threads {args.threads} = {len(combos)} runs, {minutes:.0f} min on {machine()}, "
              f"torch {torch.__version__}. Generated by `python -m benchmarks.robustness`.")
    table = summarize(records)
    (args.out / "runs.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    (args.out / "robustness.md").write_text(markdown(table, records, header))
    with open(args.out / "checks.jsonl", "w", encoding="utf-8") as file:
        for record in records:
            for check in record["checks"]:
                file.write(json.dumps({**check, "run": record["run"]}, ensure_ascii=False) + "\n")
    print()
    print(markdown(table, records, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
