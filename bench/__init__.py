"""The load benchmark (see README.md), as a package a reader can take one piece at a time.

`run.py` is the entry (`bench/run` calls it) and reads top-down: options, environment, one mode
after another, the summary. Then:

- `targets.py`: what is measured: the proxy under gunicorn, nginx as the baseline, or the
  stand-in itself; all in front of one Dify stand-in per mode;
- `modes.py`: the load modes (burst, hold, single, healthz, firehose, resume), what each one
  sends;
- `phases.py`: how one target is measured under a mode's load (`Bench`);
- `load.py`: drives the `loadgen.py` processes and summarises their per-stream timings;
- `sampling.py`: CPU and RSS of process trees and of the machine, read from /proc;
- `processes.py`: starting and stopping every process the benchmark owns;
- `report.py`: the tables, ratios and PASS/MISS verdicts on stdout;
- `profiling.py`: the optional py-spy profile of the proxy's workers.

`loadgen.py` is not imported: it runs as its own process, so no measuring code shares a GIL
with what it measures.
"""
