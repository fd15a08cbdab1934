// The digits page: draw on the pad (pointer events: mouse, pen, touch) or give an image file, and show what
// the chosen model answers. It talks only to its own server (digits ui), which holds TorchServe's key.
"use strict";

const pad = document.getElementById("pad");
const pen = pad.getContext("2d");
const picker = document.getElementById("model");
const answer = document.getElementById("answer");
const framed = document.getElementById("framed");
const whyBox = document.getElementById("why");
const whyView = document.getElementById("why-view");
const attribution = document.getElementById("attribution");
const bars = Array.from(document.querySelectorAll("#bars li"));
const STROKE = 18; // px on the 280 px pad: about an MNIST pen stroke once the digit is framed to 20 px
const RAISE = [214, 39, 40]; // the tint of a pixel that raised the explained label's score (red)
const LOWER = [31, 119, 180]; // and of one that lowered it (blue)
const INK_SHADE = 0.6; // the framed digit under the tint: dark gray ink on white, so that both tints read

let version = 0; // drawings and files since the page loaded; each answer names the version it answers
let hasInk = false;
let stroke = null; // {id, x, y} of the pointer drawing now
let running = false; // a request is on its way
let waiting = null; // the newest job to run after it

function clearPad() {
  pen.fillStyle = "#fff"; // dark ink on light paper, as people write; the server frames it as MNIST was made
  pen.fillRect(0, 0, pad.width, pad.height);
  hasInk = false;
}

function padPoint(event) {
  // pad pixels from the pointer's position in the content box (inside the border), whatever the CSS size
  const box = pad.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left - pad.clientLeft) * pad.width) / pad.clientWidth,
    y: ((event.clientY - box.top - pad.clientTop) * pad.height) / pad.clientHeight,
  };
}

function inkTo(point) {
  pen.strokeStyle = "#000";
  pen.lineWidth = STROKE;
  pen.lineCap = "round";
  pen.lineJoin = "round";
  pen.beginPath();
  pen.moveTo(stroke.x, stroke.y);
  pen.lineTo(point.x, point.y);
  pen.stroke();
  stroke.x = point.x;
  stroke.y = point.y;
  hasInk = true;
}

pad.addEventListener("pointerdown", (event) => {
  if (stroke !== null || (event.pointerType === "mouse" && event.button !== 0)) return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  const point = padPoint(event);
  stroke = { id: event.pointerId, x: point.x, y: point.y };
  inkTo(point); // a tap leaves a dot
});

pad.addEventListener("pointermove", (event) => {
  if (stroke === null || event.pointerId !== stroke.id) return;
  const moves = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const move of moves.length ? moves : [event]) inkTo(padPoint(move));
});

function endStroke(event) {
  if (stroke === null || event.pointerId !== stroke.id) return;
  stroke = null;
  newVersion();
  askAboutPad();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

function newVersion() {
  version += 1;
  pad.dataset.version = String(version);
}

// One request at a time; of the jobs that arrive meanwhile only the newest runs (older drawings are stale).
async function submit(job) {
  waiting = job;
  if (running) return;
  running = true;
  while (waiting !== null) {
    const next = waiting;
    waiting = null;
    await next();
  }
  running = false;
}

function askAboutPad() {
  if (!hasInk) return;
  submit(
    () =>
      new Promise((done) => {
        if (!hasInk) return done(); // cleared while it waited
        const asked = version; // the pad as it is now, with every stroke that ended before this ran
        pad.toBlob((png) => classify(png, asked).then(done), "image/png");
      }),
  );
}

async function classifyFile(file) {
  newVersion();
  const asked = version;
  await showOnPad(file);
  submit(() => classify(file, asked));
}

async function showOnPad(file) {
  clearPad();
  try {
    const image = await createImageBitmap(file);
    const scale = Math.min(pad.width / image.width, pad.height / image.height);
    const w = image.width * scale;
    const h = image.height * scale;
    pen.drawImage(image, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
    hasInk = true;
  } catch (err) {
    // the browser cannot show it; the server may still read it, and if not, its refusal says why
  }
}

async function classify(body, asked) {
  const model = picker.value;
  if (!model) {
    showError(asked, "No model to ask: TorchServe lists none yet (reload models).");
    return;
  }
  answer.dataset.state = "busy";
  const start = performance.now();
  let response;
  let reply;
  try {
    const why = whyBox.checked ? "&why=1" : "";
    response = await fetch("/api/classify?model=" + encodeURIComponent(model) + why, {
      method: "POST",
      body,
      headers: { "Content-Type": body.type || "application/octet-stream" },
    });
    reply = await response.json();
  } catch (err) {
    showError(asked, "The page's own server (digits ui) does not answer: is it still running?");
    return;
  }
  if (!response.ok) {
    showError(asked, reply.error || `The page's server answered ${response.status}.`);
    return;
  }
  showAnswer(asked, reply, performance.now() - start);
}

function showAnswer(asked, reply, milliseconds) {
  const top = reply.probabilities.indexOf(Math.max(...reply.probabilities));
  document.getElementById("label").textContent = String(reply.label);
  document.getElementById("confidence").textContent =
    `${reply.model} says ${reply.label}, probability ${(reply.probabilities[top] * 100).toFixed(1)}%`;
  document.getElementById("latency").textContent =
    `${Math.round(milliseconds)} ms in all, ${Math.round(reply.torchserve_ms)} ms of it in TorchServe`;
  bars.forEach((bar, digit) => {
    const p = reply.probabilities[digit];
    bar.dataset.probability = String(p);
    bar.classList.toggle("top", digit === top);
    bar.querySelector(".bar").style.height = `${(p * 100).toFixed(1)}%`;
    bar.querySelector(".value").textContent = p >= 0.005 ? `${Math.round(p * 100)}%` : "";
  });
  showFramed(reply.framed);
  showWhy(reply.framed, reply.why || null);
  document.getElementById("error").textContent = "";
  settle(asked, "answered");
}

function showFramed(rows) {
  // rows: the 28x28 image the model saw (white on black, 0-255), or null to show none
  const paint = framed.getContext("2d");
  paint.clearRect(0, 0, framed.width, framed.height);
  framed.dataset.shown = String(rows !== null);
  if (rows === null) return;
  const pixels = paint.createImageData(framed.width, framed.height);
  rows.flat().forEach((value, i) => {
    pixels.data.set([value, value, value, 255], i * 4);
  });
  paint.putImageData(pixels, 0, 0);
}

function showWhy(rows, why) {
  // why: {label, method, attributions: 28 rows of 28 scores} for the framed image `rows`, or null to show none.
  // Each pixel of the framed digit is tinted by its score over the map's largest magnitude: red raised the
  // explained label's score, blue lowered it; the map's own scale differs by method, so only its shape is shown.
  const paint = attribution.getContext("2d");
  paint.clearRect(0, 0, attribution.width, attribution.height);
  whyView.hidden = !whyBox.checked;
  attribution.dataset.shown = String(why !== null);
  document.getElementById("why-caption").textContent = why
    ? `why ${why.label} (${why.method}):`
    : whyBox.checked
      ? "why: draw a digit"
      : "";
  if (why === null) return;
  const scores = why.attributions.flat();
  const peak = Math.max(...scores.map(Math.abs));
  const pixels = paint.createImageData(attribution.width, attribution.height);
  rows.flat().forEach((value, i) => {
    const gray = 255 - value * INK_SHADE;
    const share = peak > 0 ? Math.abs(scores[i]) / peak : 0;
    const tint = scores[i] >= 0 ? RAISE : LOWER;
    pixels.data.set([...tint.map((c) => Math.round(gray * (1 - share) + c * share)), 255], i * 4);
  });
  paint.putImageData(pixels, 0, 0);
}

function showError(asked, message) {
  document.getElementById("label").textContent = "?";
  document.getElementById("confidence").textContent = "";
  document.getElementById("latency").textContent = "";
  bars.forEach((bar) => {
    delete bar.dataset.probability;
    bar.classList.remove("top");
    bar.querySelector(".bar").style.height = "0";
    bar.querySelector(".value").textContent = "";
  });
  showFramed(null);
  showWhy(null, null);
  document.getElementById("error").textContent = message;
  settle(asked, "error");
}

function settle(asked, state) {
  answer.dataset.version = String(asked);
  answer.dataset.state = state;
}

async function loadModels() {
  picker.disabled = true;
  let reply;
  try {
    const response = await fetch("/api/models");
    reply = await response.json();
    if (!response.ok) throw new Error(reply.error || `The page's server answered ${response.status}.`);
  } catch (err) {
    picker.replaceChildren(new Option("no models", ""));
    const message = err instanceof TypeError ? "The page's own server (digits ui) does not answer." : err.message;
    document.getElementById("error").textContent = `Cannot list the models: ${message}`;
    return;
  }
  const chosen = picker.value;
  picker.replaceChildren(
    ...reply.models.map((m) => new Option(m.ready ? m.name : `${m.name} (no worker ready)`, m.name)),
  );
  const names = reply.models.map((m) => m.name);
  picker.value = names.includes(chosen) ? chosen : names.includes("cnn") ? "cnn" : names[0] || "";
  picker.disabled = false;
  document.getElementById("error").textContent = names.length ? "" : "TorchServe serves no models.";
}

document.getElementById("clear").addEventListener("click", () => {
  waiting = null;
  clearPad();
  newVersion();
  document.getElementById("label").textContent = "?";
  showError(version, "");
  answer.dataset.state = "idle";
});

document.getElementById("reload").addEventListener("click", loadModels);

picker.addEventListener("change", () => {
  if (!hasInk) return;
  newVersion();
  askAboutPad();
});

whyBox.addEventListener("change", () => {
  showWhy(null, null);
  if (!hasInk) return;
  newVersion();
  askAboutPad(); // ask again, with or without the explanation
});

document.getElementById("file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) classifyFile(file);
  event.target.value = ""; // choosing the same file again classifies it again
});

document.addEventListener("dragover", (event) => {
  event.preventDefault();
  document.body.classList.add("dragging");
});
document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
document.addEventListener("drop", (event) => {
  event.preventDefault();
  document.body.classList.remove("dragging");
  const file = event.dataTransfer.files[0];
  if (file) classifyFile(file);
});

clearPad();
loadModels();
