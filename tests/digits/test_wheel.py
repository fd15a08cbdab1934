"""The installed package, not the checkout: build the wheel, install it outside the checkout, and run the main
job with it from a folder outside the checkout.

The wheel goes into a --target folder (no second venv); its commands run as `python -S -m digits` with that
folder first on PYTHONPATH and the dev venv's site-packages after it, for torch and the rest. `-S` skips the
site module, so the dev venv's editable install (a .pth file and its import finder pointing at this checkout)
never loads: a test proves that the imported `digits` lives in the install folder. The handler's files and
the drawing page's `static/` carry a marker added to the installed copies only, so an archive or a page that
came from the checkout would lack it.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import site
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests
from digits.bench.http import free_ports

REPO = Path(__file__).resolve().parents[2]
MARKER = "installed-copy-marker"
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (setuptools writes build/ and *.egg-info where it builds)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for folder in package_folders():
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out)]
    subprocess.run([*pip, str(source)], check=True, timeout=TIMEOUT_S)
    [built] = out.glob("digits-*.whl")
    return built


def package_folders() -> list[str]:
    """The folders pyproject.toml's [tool.setuptools.package-dir] maps to digits.<layer> (Python 3.10 has no
    tomllib)."""
    table = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    return re.findall(r'^"[\w.]+" = "([\w/]+)"$', table, re.M)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed non-editable into a folder of its own; marks its handler and page files."""
    target = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", str(target)]
    subprocess.run([*pip, str(wheel)], check=True, timeout=TIMEOUT_S)
    with (target / "digits" / "handlers" / "digit_handler.py").open("a") as handler:
        handler.write(f"# {MARKER}\n")
    with (target / "digits" / "serving" / "static" / "index.html").open("a") as page:
        page.write(f"<!-- {MARKER} -->\n")
    return target


def digits(installed: Path, cwd: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """`digits ARGS` run from the installed package, in `cwd`."""
    return subprocess.run(
        [sys.executable, "-S", "-m", "digits", *args], cwd=cwd, env=env_for(installed), timeout=TIMEOUT_S, **kwargs
    )


def env_for(installed: Path) -> dict[str, str]:
    """The install folder first, then the dev venv's site-packages (torch, TorchServe, ...); no checkout."""
    paths = [str(installed), *site.getsitepackages()]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONNOUSERSITE": "1"}


def test_the_wheel_holds_one_top_level_package_with_the_handler_and_page_files(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["digits"]
        [record] = [n for n in names if n.endswith(".dist-info/RECORD")]
        tops = {line.split("/", 1)[0] for line in archive.read(record).decode().splitlines()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"digits"}
    layers = ("contract", "training", "export", "handlers", "serving", "bench")
    assert {f"digits/{layer}/__init__.py" for layer in layers} <= set(names)
    handlers = {p.name for p in (REPO / "handlers").glob("digit_*.py")}
    assert handlers and {f"digits/handlers/{name}" for name in handlers} <= set(names)
    static = {p.name for p in (REPO / "serving" / "static").iterdir()}
    assert {f"digits/serving/static/{name}" for name in static} <= set(names)


def test_the_installed_package_is_what_runs_not_the_checkout(installed, tmp_path):
    probe = (
        "import sys, digits.serving, digits.handlers\n"
        "from digits.handlers import handler_dir\n"
        "print(digits.serving.__file__)\n"
        "print(handler_dir())\n"
        "print(any('editable' in type(f).__name__.lower() for f in sys.meta_path))\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", probe], cwd=tmp_path, env=env_for(installed), capture_output=True, text=True
    )
    serving_file, handlers, editable = done.stdout.split("\n")[:3]
    assert Path(serving_file).is_relative_to(installed), done.stderr
    assert Path(handlers).is_relative_to(installed) and editable == "False"
    # nothing else on the path holds a `digits` package (the dev venv's holds only its editable finder)
    others = env_for(installed)["PYTHONPATH"].split(os.pathsep)[1:]
    assert REPO not in map(Path, others) and not any((Path(p) / "digits").exists() for p in others)


@pytest.mark.skipif(shutil.which("java") is None and not os.environ.get("JAVA_HOME"), reason="TorchServe needs Java")
def test_the_installed_package_trains_exports_archives_and_serves_from_outside_the_checkout(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    run_dir, ports = work / "run", free_ports(5)
    run = lambda *args: digits(installed, work, *args, check=True, capture_output=True, text=True)  # noqa: E731
    run("train", "mlp", "--epochs", "1", "--limit", "2000", "--out", "artifacts", "--quiet")
    run("export", "mlp", "--artifacts", "artifacts")
    run("archive", "mlp", "--format", "onnx", "--artifacts", "artifacts", "--model-store", "store")
    with zipfile.ZipFile(work / "store" / "mlp.mar") as mar:
        assert MARKER in mar.read("digit_handler.py").decode()  # the installed handler, not the checkout's
    flags = dict(zip(("--inference-port", "--management-port", "--metrics-port"), map(str, ports), strict=False))
    flags |= {"--grpc-inference-port": str(ports[3]), "--grpc-management-port": str(ports[4])}
    port_args = [item for pair in flags.items() for item in pair]
    run("serve", "--model-store", "store", "--run-dir", str(run_dir), *port_args)
    try:
        run("samples", "--out", "samples", "--count", "2")
        sample = work / "samples" / "test-00000_label-7.png"
        answered = run("predict", str(sample), "--model", "mlp", "--run-dir", str(run_dir))
        label = re.search(rf"{sample.name}\s+7\s+(\d)\s", answered.stdout)
        assert label and int(label.group(1)) == onnx_label(work / "artifacts" / "mlp" / "model.onnx", sample)
        assert MARKER in page_served(installed, work, run_dir)
    finally:
        run("stop", "--run-dir", str(run_dir))


def onnx_label(model: Path, png: Path) -> int:
    """What the exported file itself answers for a 28x28 PNG: what the served archive must answer too."""
    import numpy as np
    import onnxruntime as ort
    from digits.contract import normalise
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"))[None]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return int(session.run(None, {"input": normalise(pixels, 0.1307, 0.3081, (1, 28, 28))})[0].argmax())


def announced_url(process: subprocess.Popen, seconds: float = 60) -> str:
    """The first http://127.0.0.1:PORT/ the process prints on stdout within `seconds`."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and select.select([process.stdout], [], [], left)[0]:
        line = process.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+/", line)
        if found or not line:  # a URL, or the end of its output
            assert found, f"digits ui exited without printing its URL (exit {process.poll()})"
            return found.group(0)
    raise AssertionError(f"digits ui printed no URL in {seconds} s")


def page_served(installed: Path, work: Path, run_dir: Path) -> str:
    """The drawing page's HTML as `digits ui` serves it, from the installed package."""
    ui = subprocess.Popen(
        [sys.executable, "-S", "-m", "digits", "ui", "--port", "0", "--run-dir", str(run_dir)],
        cwd=work,
        env=env_for(installed),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        return requests.get(announced_url(ui), timeout=30).text
    finally:
        ui.terminate()
        ui.wait(timeout=30)
