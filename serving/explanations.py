"""`digits explain`: asks a running TorchServe why it gives each file its label, and draws the answer.

Each file goes to `POST /explanations/MODEL` as `digits predict` sends it to /predictions (the whole body), or
as a form field "data" beside the fields "method" and "target" when they are chosen. The answer carries the
prediction, what was explained and how, the 28x28 digit as the model saw it ("framed") and the attribution map
over it; `draw` lays them side by side in one PNG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

from .client import answer_body, content_type, each_file, refusal

FIGURE_SUFFIX = ".explained.png"


@dataclass
class Explained:
    """One file's answer from /explanations."""

    file: str
    status: int
    label: int | str | None = None
    confidence: float | None = None
    target: int | str | None = None
    method: str | None = None
    settings: dict = field(default_factory=dict)
    model: str = ""  # name and version, as the server names them
    framed: np.ndarray | None = None  # (28, 28) uint8, white on black
    attributions: np.ndarray | None = None  # (28, 28) float32
    error: str | None = None


def explain_file(
    path: Path,
    url: str,
    model: str,
    token: str,
    method: str | None = None,
    target: str | None = None,
    timeout: float = 120,
) -> Explained:
    """One POST to /explanations/MODEL; a refusal comes back as the status and the server's message."""
    payload, kind = Path(path).read_bytes(), content_type(Path(path))
    endpoint, headers = f"{url}/explanations/{model}", {"Authorization": f"Bearer {token}"}
    choices = {name: value for name, value in (("method", method), ("target", target)) if value is not None}
    if choices:
        files = {"data": (Path(path).name, payload, kind)}
        response = requests.post(endpoint, files=files, data=choices, headers=headers, timeout=timeout)
    else:
        response = requests.post(endpoint, data=payload, headers={**headers, "Content-Type": kind}, timeout=timeout)
    body = answer_body(response)
    if response.status_code != 200:
        return Explained(str(path), response.status_code, error=refusal(body))
    return Explained(
        str(path),
        200,
        label=body["label"],
        confidence=body["confidence"],
        target=body["target"],
        method=body["method"],
        settings=body["settings"],
        model=f"{body['model_name']} {body['model_version']}",
        framed=np.asarray(body["framed"], dtype=np.uint8),
        attributions=np.asarray(body["attributions"], dtype=np.float32),
    )


def explain_files(
    files: list[Path],
    model: str,
    run_dir: Path,
    url: str | None = None,
    token: str | None = None,
    method: str | None = None,
    target: str | None = None,
) -> list[Explained]:
    def send(path: Path, url: str, token: str) -> Explained:
        return explain_file(path, url, model, token, method, target)

    return each_file(files, run_dir, url, token, send)


def figure_path(out: Path, file: str, index: int, taken: set[Path]) -> Path:
    """OUT/<file stem>.explained.png; a stem met twice gets its position in the command line too."""
    path = out / f"{Path(file).stem}{FIGURE_SUFFIX}"
    if path in taken:
        path = out / f"{Path(file).stem}-{index}{FIGURE_SUFFIX}"
    taken.add(path)
    return path


def draw(explained: Explained, path: Path) -> Path:
    """Writes the framed digit and its attribution map side by side, the digit's outline over the map.

    The map's colours are symmetric around 0 (red: pixels that raised the explained label's log-probability,
    blue: pixels that lowered it), scaled to its largest magnitude, so that the two signs compare fairly.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here or in CI
    import matplotlib.pyplot as plt

    maps = explained.attributions
    scale = float(np.abs(maps).max()) or 1.0
    figure, (digit_ax, map_ax) = plt.subplots(1, 2, figsize=(7.2, 3.8))
    digit_ax.imshow(explained.framed, cmap="gray", vmin=0, vmax=255)
    digit_ax.set_title(f"the digit as the model saw it\nlabel {explained.label} ({100 * explained.confidence:.1f}%)")
    image = map_ax.imshow(maps, cmap="RdBu_r", vmin=-scale, vmax=scale)
    map_ax.contour(explained.framed, levels=[127.5], colors="0.4", linewidths=0.6)  # the strokes' outline
    map_ax.set_title(f"why {explained.target}: {explained.method}\nred raised it, blue lowered it")
    for ax in (digit_ax, map_ax):
        ax.set_xticks([])
        ax.set_yticks([])
    bar = figure.colorbar(image, ax=map_ax, fraction=0.046, pad=0.04)
    bar.set_label(f"share of log p({explained.target})")
    settings = ", ".join(f"{key} {value}" for key, value in explained.settings.items())
    figure.suptitle(f"{Path(explained.file).name}: {explained.model}, {settings}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
