"""treadle's benchmark harness: the standard workloads of shared/DESIGN.md section 6.

Run a benchmark as a script (`python bench/w1.py`); see bench/README.md.
"""
