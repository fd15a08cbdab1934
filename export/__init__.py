"""The export layer: a checkpoint becomes TorchScript and ONNX files, with a parity report proving both.

Modules, one job each: `torchscript.py` and `onnx.py` write and check one format, `metadata.py` decides
what travels with the files, `quantize.py` writes the int8 file, `parity.py` holds the one parity check and
its tolerances, `runners.py` the ways of running a model that it compares, `reports.py` the reports it
writes, `cpu.py` the machine they name, and `convert.py` runs the steps for `digits export` and
`digits verify`.
"""

from __future__ import annotations


class ExportError(ValueError):
    """Exported files that cannot be written, read or trusted; the message says what to run instead."""
