"""The export layer: a checkpoint becomes TorchScript, ONNX, int8 ONNX and `.pt2` (AOTInductor) files, with
parity reports proving each against the eager model.

Modules, one job each: `torchscript.py`, `onnx.py` and `pt2.py` write and check one format, `quantize.py`
writes the int8 file, `metadata.py` decides what travels with the files, `exporters.py` registers each
format's steps, `parity.py` holds the one parity check and its tolerances, `runners.py` the ways of running a
model that it compares, `reports.py` the reports it writes, `cpu.py` the machine they name, and `convert.py`
walks the registry for `digits export` and `digits verify`.
"""

from __future__ import annotations


class ExportError(ValueError):
    """Exported files that cannot be written, read or trusted; the message says what to run instead."""
