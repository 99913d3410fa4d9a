"""Speed and memory benchmarks of the course's recipes (run: `python -m benchmarks.run --quick`).

Taught in notebooks/13_speed_and_memory.ipynb; the theory is in lessons/13_speed_and_memory.md.
"""
