"""Speed and memory benchmarks of the course's recipes (run: `python -m benchmarks.run --quick`).

Taught in notebooks/12_speed_and_memory.ipynb; the theory is in lessons/12_speed_and_memory.md.
"""
