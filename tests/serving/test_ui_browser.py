"""`digits ui` in a real browser: headless Chromium driven by selenium, on a real TorchServe from `digits serve`.

One TorchServe and one browser for the module. The digits are drawn with real pointer events (mouse, pen and
touch), stroke by stroke, as a person would; the page must show what TorchServe answers for the very image
on the pad, and never hand the browser a key. Skips where Debian's chromium or chromium-driver is absent.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from digits.serving.samples import drawn_large
from digits.serving.server import read_state, read_token, refresh_token
from PIL import Image
from serving_helpers import PORT_FLAGS, free_ports, port_flags

from digits.cli import main

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.actions import interaction  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.actions.pointer_input import PointerInput  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no Chromium here: the browser tests need Debian's chromium and chromium-driver "
    "(apt-get install -y chromium chromium-driver)",
)

PAD = 280  # the page's drawing pad, CSS pixels = canvas pixels
SCALE = 9  # pad pixels per MNIST pixel: a 28x28 digit drawn 252 px large
DRAWN_DIGITS = 20
ANSWER_TIMEOUT_S = 60
SCREENSHOT_ENV = "DIGITS_UI_SCREENSHOT"  # where to copy the screenshot too (docs/ui.png is made this way)


# ---- strokes ---------------------------------------------------------------------------------------------


def strokes_of(digit: np.ndarray, threshold: int = 100) -> list[list[tuple[float, float]]]:
    """An MNIST digit's ink as pen strokes on the pad: each run of ink pixels in a row is one horizontal
    stroke (a single pixel: a dot), scaled SCALE times, in pad pixels."""
    margin = (PAD - 28 * SCALE) / 2
    strokes = []
    for row in range(28):
        ink = np.flatnonzero(digit[row] >= threshold)
        for run in np.split(ink, np.flatnonzero(np.diff(ink) > 1) + 1) if ink.size else []:
            y = margin + (row + 0.5) * SCALE
            strokes.append([(margin + (run[0] + 0.5) * SCALE, y), (margin + (run[-1] + 0.5) * SCALE, y)])
    return strokes


def ellipse(cx: float, cy: float, rx: float, ry: float, points: int = 36) -> list[tuple[float, float]]:
    angles = np.linspace(0, 2 * np.pi, points + 1)
    return [(cx + rx * np.sin(a), cy - ry * np.cos(a)) for a in angles]


# The plain shapes people draw, each with its own kind of pointer
PLAIN_SHAPES = {
    "one (touch)": (1, "touch", [[(150, 40), (140, 240)]]),
    "seven (pen)": (7, "pen", [[(70, 50), (210, 50), (120, 240)]]),
    "zero (mouse)": (0, "mouse", [ellipse(140, 140, 60, 95)]),
}


# ---- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchserve(store, tmp_path_factory) -> Path:
    """A TorchServe of its own (a test refreshes its keys, another stops it): the run folder."""
    run_dir = tmp_path_factory.mktemp("ui-run")
    ports = port_flags(free_ports(len(PORT_FLAGS)))
    assert main(["serve", "--model-store", str(store), "--run-dir", str(run_dir), *ports]) == 0
    yield run_dir
    assert main(["stop", "--run-dir", str(run_dir)]) == 0


@pytest.fixture(scope="module")
def keys_seen(torchserve) -> set[str]:
    """Every key TorchServe handed out in this module's run; tests add the keys they make."""
    return {read_token(torchserve, kind) for kind in ("inference", "management", "API")}


@pytest.fixture(scope="module")
def ui_url(torchserve):
    """`digits ui` as a user runs it, in its own process; its address as it prints it."""
    command = [sys.executable, "-m", "digits", "ui", "--port", "0", "--run-dir", str(torchserve)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = process.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:\d+/", line)
    assert match, f"digits ui printed {line!r}"
    yield match.group(0)
    process.terminate()
    output, _ = process.communicate(timeout=10)
    assert "Traceback" not in output, output  # nothing the browser or the tests sent is worth a traceback


@pytest.fixture(scope="module")
def browser(ui_url):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=840,760"):
        options.add_argument(flag)  # no sandbox: CI runs as root, where Chromium refuses to start with one
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.get(ui_url)
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").is_enabled())
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def received(browser) -> list[str]:
    """Everything the browser received over the network, collected after each test (see `record`)."""
    return []


@pytest.fixture(autouse=True)
def record(browser, received):
    """After each test, what the browser received in it (see `collect`)."""
    yield
    collect(browser, received)


def collect(driver, received: list[str]) -> None:
    """Appends every network event (with its headers) and every response body from Chrome's performance log."""
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        received.append(json.dumps(message))
        if message["method"] != "Network.loadingFinished":
            continue
        try:
            body = driver.execute_cdp_cmd("Network.getResponseBody", {"requestId": message["params"]["requestId"]})
        except Exception:  # noqa: BLE001 (a response without a body, e.g. a 204, has none to give)
            continue
        text = body["body"]
        received.append(base64.b64decode(text).decode("latin-1") if body["base64Encoded"] else text)


@pytest.fixture(scope="module")
def confident_digits(torchserve, mnist) -> list[int]:
    """Two test digits of each class that the fixture cnn reads right with probability >= 0.9, served as PNG.

    The fixture cnn is briefly trained (about 95% right): the test checks the drawn path and the page, not
    the model's accuracy, so it draws digits the model itself is sure of, the first ones in the test set."""
    state, token = read_state(torchserve), read_token(torchserve)
    chosen: dict[int, list[int]] = {label: [] for label in range(10)}
    for index, digit in enumerate(mnist.test_images[:500]):
        label = int(mnist.test_labels[index])
        if len(chosen[label]) == DRAWN_DIGITS // 10:
            continue
        response = requests.post(
            f"{state.inference_url}/predictions/cnn",
            data=png(Image.fromarray(digit, mode="L")),
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        body = response.json()
        if body["label"] == label and body["confidence"] >= 0.9:
            chosen[label].append(index)
    short = {label: len(indices) for label, indices in chosen.items() if len(indices) < DRAWN_DIGITS // 10}
    assert not short, f"the fixture cnn is sure of too few of the first 500 test digits of some classes: {short}"
    return sorted(i for indices in chosen.values() for i in indices)


# ---- page helpers ----------------------------------------------------------------------------------------


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def draw(driver, strokes: list[list[tuple[float, float]]], kind: str = "mouse") -> None:
    """Draws each stroke with real pointer events of `kind` (mouse, pen, touch): down, moves, up."""
    pad = driver.find_element(By.ID, "pad")
    pointer = PointerInput({"mouse": interaction.POINTER_MOUSE, "pen": interaction.POINTER_PEN}.get(kind, kind), kind)
    actions = ActionBuilder(driver, mouse=pointer, duration=0)
    for stroke in strokes:
        (x, y), rest = stroke[0], stroke[1:]
        actions.pointer_action.move_to(pad, round(x - PAD / 2), round(y - PAD / 2))  # offsets from the centre
        actions.pointer_action.pointer_down()
        for x, y in rest:
            actions.pointer_action.move_to(pad, round(x - PAD / 2), round(y - PAD / 2))
        actions.pointer_action.pointer_up()
    actions.perform()


def clear(driver) -> None:
    driver.find_element(By.ID, "clear").click()


def wait_for_answer(driver) -> str:
    """Waits until the page shows the answer to its latest drawing or file; returns 'answered' or 'error'."""

    def settled(d):
        state = d.execute_script(
            "const a = document.getElementById('answer'), p = document.getElementById('pad');"
            "return a.dataset.version === p.dataset.version && a.dataset.state !== 'busy' ? a.dataset.state : null;"
        )
        return state

    try:
        return WebDriverWait(driver, ANSWER_TIMEOUT_S, poll_frequency=0.05).until(settled)
    except TimeoutException:
        pytest.fail(f"the page did not answer within {ANSWER_TIMEOUT_S} s: {page_text(driver)!r}")


def shown(driver) -> dict:
    """What the page shows: the label, the ten probabilities of its bar chart, the error, the framed image."""
    return driver.execute_script(
        "const bars = Array.from(document.querySelectorAll('#bars li'));"
        "const framed = document.getElementById('framed');"
        "return {label: document.getElementById('label').textContent,"
        " probabilities: bars.map(li => li.dataset.probability === undefined ? null : Number(li.dataset.probability)),"
        " heights: bars.map(li => li.querySelector('.bar').style.height),"
        " latency: document.getElementById('latency').textContent,"
        " error: document.getElementById('error').textContent,"
        " framedShown: framed.dataset.shown === 'true',"
        " framed: Array.from(framed.getContext('2d').getImageData(0, 0, 28, 28).data).filter((_, i) => i % 4 === 0)};"
    )


def pad_png(driver) -> bytes:
    url = driver.execute_script("return document.getElementById('pad').toDataURL('image/png');")
    return base64.b64decode(url.split(",", 1)[1])


def page_text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def ask_torchserve(run_dir: Path, model: str, image: bytes, why: bool = False) -> dict:
    """TorchServe's own answer to `image`, asked directly over the Open Inference Protocol, as the page's server
    asks it (with `why`, the attributions too)."""
    state, headers = read_state(run_dir), {"Authorization": f"Bearer {read_token(run_dir)}"}
    outputs = ["probabilities", "label", "framed", *(["attributions"] if why else [])]
    request = {
        "inputs": [{"name": "digit", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}],
        "outputs": [{"name": name} for name in outputs],
    }
    url = f"{state.inference_url}/v2/models/{model}/infer"
    response = requests.post(url, json=request, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()["outputs"]
    outputs = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in answer}
    found = {
        "label": int(outputs["label"][0]),
        "probabilities": outputs["probabilities"][0].tolist(),
        "framed": outputs["framed"][0].reshape(-1).tolist(),
    }
    if why:
        found["attributions"] = outputs["attributions"][0]
        found["method"] = next(o["parameters"]["method"] for o in answer if o["name"] == "attributions")
    return found


# the why view's colours, as app.js mixes them: each framed pixel as dark ink on white, tinted by its score
RAISE, LOWER, INK_SHADE = np.array([214, 39, 40]), np.array([31, 119, 180]), 0.6


def why_colours(framed: list[int], attributions: np.ndarray) -> np.ndarray:
    """(784, 3) the RGB the why view must show for a framed digit and its map."""
    gray = 255 - np.asarray(framed, dtype=np.float64) * INK_SHADE
    scores = attributions.reshape(-1).astype(np.float64)
    peak = np.abs(scores).max()
    share = np.abs(scores) / peak if peak > 0 else np.zeros_like(scores)
    tint = np.where(scores[:, None] >= 0, RAISE, LOWER)
    return np.floor(gray[:, None] * (1 - share[:, None]) + tint * share[:, None] + 0.5)


def why_shown(driver) -> dict:
    """The why view: whether it is open, its caption, and its canvas (whether it shows a map, its RGB)."""
    return driver.execute_script(
        "const c = document.getElementById('attribution');"
        "const rgba = Array.from(c.getContext('2d').getImageData(0, 0, 28, 28).data);"
        "return {open: !document.getElementById('why-view').hidden,"
        " caption: document.getElementById('why-caption').textContent, shown: c.dataset.shown === 'true',"
        " rgb: rgba.filter((_, i) => i % 4 !== 3)};"
    )


def set_why(driver, on: bool) -> None:
    box = driver.find_element(By.ID, "why")
    if box.is_selected() != on:
        box.click()


def choose_file(driver, path: Path) -> str:
    driver.find_element(By.ID, "file").send_keys(str(path))
    return wait_for_answer(driver)


# ---- tests -----------------------------------------------------------------------------------------------


def test_the_page_lists_the_served_models_and_picks_the_cnn(browser):
    picker = Select(browser.find_element(By.ID, "model"))
    assert [o.get_attribute("value") for o in picker.options] == ["cnn", "mlp"]
    assert picker.first_selected_option.get_attribute("value") == "cnn"


def test_drawn_digits_are_read_as_torchserve_reads_the_pad(browser, torchserve, mnist, confident_digits):
    drawings = [
        (f"test digit {i}", int(mnist.test_labels[i]), "mouse", strokes_of(mnist.test_images[i]))
        for i in confident_digits
    ]
    drawings += [(name, label, kind, strokes) for name, (label, kind, strokes) in PLAIN_SHAPES.items()]
    right, wrong = 0, []
    for name, label, kind, strokes in drawings:
        clear(browser)
        draw(browser, strokes, kind)
        assert wait_for_answer(browser) == "answered", f"{name}: {page_text(browser)!r}"
        page = shown(browser)
        truth = ask_torchserve(torchserve, "cnn", pad_png(browser))  # the very image on the pad
        assert page["label"] == str(truth["label"]), name
        assert page["probabilities"] == pytest.approx(truth["probabilities"], abs=1e-4), name
        heights = [float(h.rstrip("%")) for h in page["heights"]]  # the bar chart: each bar's height in %
        assert heights == pytest.approx([p * 100 for p in truth["probabilities"]], abs=0.051), name
        assert page["framedShown"] and page["framed"] == truth["framed"], name  # what the model saw, pixel for pixel
        assert re.fullmatch(r"\d+ ms in all, \d+ ms of it in TorchServe", page["latency"]), page["latency"]
        if page["label"] == str(label):
            right += 1
        else:
            wrong.append(f"{name}: drew {label}, read {page['label']}")
    assert right >= 0.9 * len(drawings), f"{right}/{len(drawings)} right; {wrong}"


def test_the_why_view_tints_each_framed_pixel_by_the_models_own_attribution(
    browser, torchserve, mnist, confident_digits
):
    clear(browser)
    set_why(browser, True)
    assert why_shown(browser)["open"] and not why_shown(browser)["shown"]  # open, waiting for a drawing
    for model, method in (("cnn", "feature-ablation"), ("mlp", "integrated-gradients")):
        Select(browser.find_element(By.ID, "model")).select_by_value(model)
        clear(browser)
        draw(browser, strokes_of(mnist.test_images[confident_digits[5]]))
        assert wait_for_answer(browser) == "answered", page_text(browser)
        page, why = shown(browser), why_shown(browser)
        truth = ask_torchserve(torchserve, model, pad_png(browser), why=True)  # the very image on the pad
        assert truth["method"] == method  # the served format's default
        assert why["open"] and why["shown"] and why["caption"] == f"why {truth['label']} ({method}):"
        assert page["framed"] == truth["framed"]
        rgb = np.asarray(why["rgb"], dtype=np.float64).reshape(-1, 3)
        expected = why_colours(truth["framed"], truth["attributions"])
        assert np.abs(rgb - expected).max() <= 2, model  # a pixel's tint, within rounding of the map's floats
        assert (rgb[:, 0] - rgb[:, 2] > 60).sum() >= 10, model  # not a blank map: ink that raised the label
    Select(browser.find_element(By.ID, "model")).select_by_value("cnn")
    assert wait_for_answer(browser) == "answered"  # changing the model asks again
    set_why(browser, False)  # closing the view asks again, without the explanation
    assert wait_for_answer(browser) == "answered"
    assert not why_shown(browser)["open"] and not why_shown(browser)["shown"]


def test_a_screenshot_of_a_drawn_three_and_why(browser, mnist, confident_digits, tmp_path):
    three = next(i for i in confident_digits if mnist.test_labels[i] == 3)
    clear(browser)
    set_why(browser, True)
    draw(browser, strokes_of(mnist.test_images[three]))
    assert wait_for_answer(browser) == "answered"
    assert shown(browser)["label"] == "3" and why_shown(browser)["shown"]
    path = tmp_path / "ui.png"
    assert browser.save_screenshot(str(path))
    assert Image.open(path).size[0] >= 800
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(path, os.environ[SCREENSHOT_ENV])
    set_why(browser, False)
    assert wait_for_answer(browser) == "answered"


def test_a_chosen_image_file_is_classified(browser, mnist, confident_digits, tmp_path):
    index = confident_digits[0]
    path = tmp_path / "drawn.png"
    drawn_large(mnist.test_images[index], np.random.default_rng(0)).save(path)
    assert choose_file(browser, path) == "answered", page_text(browser)
    assert shown(browser)["label"] == str(mnist.test_labels[index])


def test_a_dropped_image_file_is_classified(browser, mnist, confident_digits):
    index = confident_digits[1]
    payload = base64.b64encode(png(drawn_large(mnist.test_images[index], np.random.default_rng(1)))).decode()
    browser.execute_script(
        "const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));"
        "const transfer = new DataTransfer();"
        "transfer.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));"
        "document.getElementById('pad').dispatchEvent("
        " new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));",
        payload,
    )
    assert wait_for_answer(browser) == "answered", page_text(browser)
    assert shown(browser)["label"] == str(mnist.test_labels[index])


def test_a_file_that_is_no_image_is_refused_in_words(browser, tmp_path):
    path = tmp_path / "not-an-image.png"
    path.write_text("this is a note, not a picture\n")
    assert choose_file(browser, path) == "error"
    page = shown(browser)
    assert page["error"].startswith("TorchServe refused the image: "), page["error"]
    assert page["label"] == "?" and page["probabilities"] == [None] * 10


def test_a_file_over_the_limit_is_refused_in_words(browser, tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(png(Image.new("L", (16, 16), 255)) + b"\0" * (3 * 2**20))
    assert choose_file(browser, path) == "error"
    assert "this page forwards at most 2 MiB" in shown(browser)["error"]


def test_an_expired_key_is_replaced_without_the_user_noticing(browser, torchserve, keys_seen, mnist):
    key_file = torchserve / "key_file.json"
    stale = key_file.read_text()
    keys_seen.add(refresh_token(torchserve, "inference"))  # TorchServe stops accepting the old inference key
    key_file.write_text(stale)  # the file names a key TorchServe no longer takes, as after 60 minutes
    clear(browser)
    draw(browser, strokes_of(mnist.test_images[0]))
    assert wait_for_answer(browser) == "answered", page_text(browser)
    fresh = read_token(torchserve, "inference")
    assert fresh != json.loads(stale)["inference"]["key"]
    keys_seen.add(fresh)


def test_a_model_without_a_ready_worker_is_named_in_words(browser, torchserve, keys_seen, mnist):
    state = read_state(torchserve)
    response = requests.put(
        f"{state.management_url}/models/mlp",
        params={"min_worker": 0, "max_worker": 0, "synchronous": "true"},
        headers={"Authorization": f"Bearer {read_token(torchserve, 'management')}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    browser.find_element(By.ID, "reload").click()
    WebDriverWait(browser, 10).until(lambda d: "mlp (no worker ready)" in d.find_element(By.ID, "model").text)
    clear(browser)
    draw(browser, strokes_of(mnist.test_images[0]))
    assert wait_for_answer(browser) == "answered"  # by the cnn
    Select(browser.find_element(By.ID, "model")).select_by_value("mlp")  # asks again, now the mlp
    assert wait_for_answer(browser) == "error"
    assert shown(browser)["error"].startswith("model mlp is not ready: "), shown(browser)["error"]
    Select(browser.find_element(By.ID, "model")).select_by_value("cnn")
    assert wait_for_answer(browser) == "answered"


def test_the_browser_never_receives_a_key(browser, received, keys_seen):
    collect(browser, received)
    storage = browser.execute_script(
        "return JSON.stringify([document.cookie, Object.entries(localStorage), Object.entries(sessionStorage)]);"
    )
    everything = "\n".join([browser.page_source, storage, *received])
    # not an empty check: the page's files and the answers' bodies were all recorded
    for sample in ('id="pad"', "getCoalescedEvents", '"probabilities"', "TorchServe refused the image"):
        assert any(sample in text for text in received), f"nothing received holds {sample!r}"
    assert "Authorization" not in everything
    for key in keys_seen:
        assert key not in everything


def test_a_stopped_torchserve_is_reported_in_words(browser, torchserve, mnist):
    assert main(["stop", "--run-dir", str(torchserve)]) == 0
    clear(browser)
    draw(browser, strokes_of(mnist.test_images[0]))
    assert wait_for_answer(browser) == "error"
    assert "TorchServe is not running" in shown(browser)["error"]
    browser.find_element(By.ID, "reload").click()
    WebDriverWait(browser, 10).until(lambda d: "Cannot list the models" in page_text(d))
    assert "TorchServe is not running" in page_text(browser)
