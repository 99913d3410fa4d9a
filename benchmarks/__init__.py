"""Speed and memory benchmarks of the course's recipes (run: `python -m benchmarks.run --quick`).

Taught in notebooks/14_speed_and_memory.ipynb; the theory is in lessons/14_speed_and_memory.md.
"""
