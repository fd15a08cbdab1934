"""The TorchServe handler's files, installed as `digits.handlers` so that `digits archive` finds them.

They are not imported from here: an archive ships `digit_*.py` flat in the model dir, where TorchServe
imports `digit_handler` by bare name and the modules import each other the same way (see `digit_handler.py`).
Code outside an archive that runs them (the tests, `examples/onnx_app.py`) puts this folder on `sys.path`.
"""

from importlib.resources import files
from pathlib import Path


def handler_dir() -> Path:
    """The folder holding the handler's files, in a checkout or an installed wheel alike."""
    return Path(str(files(__name__)))
