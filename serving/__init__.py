"""The serving layer: drives TorchServe from outside, with the archives the export layer's files make.

Modules, one job each: `archive.py` packs an exported model, its metadata and the handler into a `.mar`;
`config.py` writes TorchServe's `config.properties`; `server.py` starts, watches and stops TorchServe and
reads its keys; `client.py` sends digits over HTTP; `samples.py` renders MNIST digits as the image files a
client sends; `ui.py` serves the drawing page of `digits ui` (`static/`) and forwards its images to TorchServe
with the run folder's keys. Nothing here imports `training` (the data flows one way) or runs inside a worker
(`handlers/`).
"""
