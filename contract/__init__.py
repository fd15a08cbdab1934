"""The artefact contract: what each step writes to disk and the next one reads, decided once.

Data flows one way: checkpoint -> exported files -> archive -> server. Every layer but `handlers/` imports
the names from here; the handler ships alone inside the `.mar` and keeps its own copy of the few it needs
(`handlers/digit_contract.py`), which `tests/handlers/test_contract_copy.py` pins to this module.
Training decides the values (mean, std, labels, input shape, layout:
`training/constants.py`); this module decides their names, the files they travel in, and the one formula
that applies them.

Adding an export format is one line in `FORMATS` plus its exporter (`export/exporters.py`, which `digits export`
and `digits verify` walk) and its loader (the handler's, `handlers/digit_model.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Files in DIR/MODEL/ (`digits train` and `digits export`)
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"  # training's figures: test accuracy, times, the history per epoch
HISTORY_PLOT = "history.png"
PARITY_REPORT = "parity"  # the fp32 files' report: parity.json, parity.md
PARITY_JSON = f"{PARITY_REPORT}.json"
PARITY_MD = f"{PARITY_REPORT}.md"
MANIFEST_FILE = "export.json"  # written only when parity passes: the archive step trusts it

# Files inside a `.mar` beside the model file and the handler
META_FILE = "digits_meta.json"
CONFIG_FILE = "model-config.yaml"
ARCHIVE_MANIFEST = "MAR-INF/MANIFEST.json"  # torch-model-archiver's: the model's name and version
DEFAULT_VERSION = "1.0"  # what `digits archive` writes without --version (the archiver's own default)
# model-config.yaml's section for the handler itself (TorchServe hands the file to it as
# context.model_yaml_config), and its key for the intra-op threads of each worker
HANDLER_SECTION = "handler"
THREADS_KEY = "threads"
# ... and its key for the largest answer body the handler may build: TorchServe's frontend drops a worker's
# reply holding a longer one (and the worker with it), so `digits serve` and `digits kserve` write the archives'
# value as config.properties' max_response_size; without the key, TorchServe's own default holds for both
RESPONSE_LIMIT_KEY = "max_response_size"
TORCHSERVE_MAX_RESPONSE = 6_553_500  # ConfigManager.getMaxResponseSize's default in TorchServe 0.12.0

# Inside a `.pt2` package (`digits export --pt2`): the facts its compiled code depends on, in an entry that
# `zipfile` reads without loading any code, and the keys a loader refuses a package without
PT2_META_ENTRY = "extra/digits_meta.json"
PT2_REQUIRED_KEYS = ("torch_version", "device", "target", "min_batch", "max_batch")

# Open Inference Protocol outputs of a digits model: name -> datatype. A request gets OIP_DEFAULT_OUTPUTS
# unless its `outputs` names others. probabilities [N, classes]; label [N] (the label itself for "0".."9");
# framed [N, H, W], each digit as the model saw it after framing, white on black; attributions [N, H, W], each
# pixel's share of the explained label's log-probability (the handler's explanations, digit_explain.py).
OIP_OUTPUTS = {"probabilities": "FP32", "label": "INT64", "framed": "UINT8", "attributions": "FP32"}
OIP_DEFAULT_OUTPUTS = ("probabilities", "label")
# Headers the handler puts on every answer, both protocols: the archive's version (which version answered,
# for /predictions clients as OIP's `model_version` tells OIP ones), and a token of the worker process (random,
# drawn when it loads), by which `digits rollout` knows that every worker of a version has finished its batch
VERSION_HEADER = "Model-Version"
WORKER_HEADER = "Digits-Worker"


@dataclass(frozen=True)
class Format:
    """One exported file format.

    name: its name in export.json's `files`, `digits archive --format` and `digits bench http --format`.
    file: the file in DIR/MODEL/.
    runtime: what the handler loads it with; `digits_meta.json`'s `format`. The handler tells the runtime
        from the file's suffix too, so one suffix means one runtime.
    proof: how export proves it: "logits" (within the parity tolerances, argmax equal, in parity.json) or
        "predictions" (quantised files: argmax agreement and accuracy over the test set, in its own report).
    report: the stem of its parity report files (`<report>.json`, `<report>.md`).
    export_flags: what to add to `digits export MODEL` for it, if anything.
    """

    name: str
    file: str
    runtime: str
    proof: str = "logits"
    report: str = PARITY_REPORT
    export_flags: str = ""

    @property
    def optional(self) -> bool:
        """Written only when asked for (its `export_flags`); the others on every export."""
        return bool(self.export_flags)

    @property
    def suffix(self) -> str:
        return "." + self.file.rsplit(".", 1)[1]

    @property
    def parity_json(self) -> str:
        return f"{self.report}.json"

    @property
    def parity_md(self) -> str:
        return f"{self.report}.md"


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("torchscript", "model.pt", "torchscript"),
        Format("onnx", "model.onnx", "onnx"),
        Format("onnx-int8", "model.int8.onnx", "onnx", "predictions", "parity-int8", "--quantize int8"),
        Format("pt2", "model.pt2", "pt2", export_flags="--pt2"),  # AOTInductor, compiled for one device
    )
}
TORCHSCRIPT, ONNX, ONNX_INT8, PT2 = FORMATS["torchscript"], FORMATS["onnx"], FORMATS["onnx-int8"], FORMATS["pt2"]

# What an app must know to turn an image into the model's input and its output into a label. Decided in
# training; carried in the checkpoint, the ONNX metadata_props, export.json and digits_meta.json.
PREPROCESSING_KEYS = ("mean", "std", "input_shape", "layout", "labels")
# checkpoint metadata that export copies into the ONNX file and export.json, under the same names
CARRIED_KEYS = ("model", *PREPROCESSING_KEYS, "test_accuracy")
# what a checkpoint must hold for export to rebuild the model without guessing
CHECKPOINT_KEYS = ("model", "model_args", *PREPROCESSING_KEYS)
# digits_meta.json: the model file's runtime and digest, then the carried facts
ARCHIVE_META_KEYS = ("format", "sha256", "model_file", *CARRIED_KEYS)
# digits_meta.json's record of the export's parity verdict (passed, report file, its SHA-256): read by
# `digits rollout` before it registers an archive, never by the handler
PARITY_KEY = "parity"
# of those, what the handler refuses to start without
ARCHIVE_REQUIRED_KEYS = ("format", "sha256", *PREPROCESSING_KEYS)
LAYOUTS = ("NCHW",)

# The formula, in words, for apps that read the ONNX metadata (the numbers travel beside it)
NORMALISATION = "x = (pixel / 255 - mean) / std, white digit on a black background"


def normalise(pixels: np.ndarray, mean: float, std: float, input_shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """Intensities 0..255, white digit on black, (N, H, W) of any real dtype -> (N, *input_shape) float32.

    The float32 operations, in this order, are what training applied (bit for bit what torch's
    `x.float().div(255).sub(mean).div(std)` gives), so a served or exported model sees its training inputs.
    """
    x = np.array(pixels, dtype=np.float32)  # a fresh array: safe to scale in place
    x /= np.float32(255.0)
    x -= np.float32(mean)
    x /= np.float32(std)
    return x.reshape(len(x), *input_shape)
