"""The benchmark layer: measures the other layers' outputs side by side, each against a ceiling.

`offline.py` times the exported files in-process (eager, TorchScript, onnxruntime, int8, .pt2) against
the machine's measured fp32 peak; `http.py` times a TorchServe that it starts, the model beside a no-op
handler with the same batch settings; `load.py` holds the load generators; `timing.py` the statistics,
the FLOP count, the peak and the machine; `report.py` writes each run's JSON, markdown table and plot;
`performance.py` renders every run of `make bench` into one report, docs/performance.md.
Absolute times drift on a shared machine: every comparison is a ratio of two figures from one run.
"""

from __future__ import annotations


class BenchError(ValueError):
    """A benchmark that cannot run as asked; the message says why and what to do (exit 2, like bad input)."""
