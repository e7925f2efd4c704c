"""The benchmark: `python -m p2prl.bench` (runs.py plans and launches the runs, report.py turns what
they leave behind into tables and bench.json, sb3.py is one Stable-Baselines3 baseline run; results.py
assembles the results page from earlier bench dirs, beside the published returns of references.py)."""
