"""The benchmarks: run each as `python bench/NAME.py` or `python -m bench.NAME`; bench/workers.py is their
shared code and bench/report.py what they print."""
