#!/usr/bin/env bash
# Follow-up GPU check: the fixes made after check.sh's first run (full fp32 in the handler, deterministic cuDNN).
#   bash .gpu/check2.sh     (carry .gpu and .whl)
source "$(dirname "$0")/check.sh"
follow_up() {
    section "A same seed twice on CUDA: identical weights?"
    timeout -k 5 "$(cap 150)" python3 - <<PY
import torch
from digits.training.train import TrainConfig, train
for model, limit in (("mlp", 2000), ("cnn", 2000), ("resnet18", 512)):
    sd = []
    for run in ("a", "b"):
        train(TrainConfig(model=model, epochs=1, limit=limit, device="cuda", out="$WORK/seed2/" + run, quiet=True), log=lambda _: None)
        sd.append(torch.load("$WORK/seed2/" + run + f"/{model}/checkpoint.pt", weights_only=True)["state_dict"])
    diff = max((sd[0][k].double() - sd[1][k].double()).abs().max().item() for k in sd[0])
    print(f"{model}: identical {diff == 0} | largest difference {diff:.3g}")
PY
    section "B the handler on cuda:0 vs cpu, a cnn trained 1 epoch on CUDA, 512 test digits (TorchScript)"
    timeout -k 5 "$(cap 120)" python3 - <<PY
import sys, warnings, numpy as np, torch
sys.path[:0] = ["handlers", "tests/handlers"]
warnings.simplefilter("ignore", FutureWarning)
from pathlib import Path
from digits.training.train import TrainConfig, train
from digits.training.checkpoint import load_checkpoint, rebuild_model
from digits.training.data import load_mnist
from handler_helpers import write_model_dir, make_context, run_batch, png_bytes
from digit_handler import DigitHandler
print("matmul precision after importing digit_handler:", torch.get_float32_matmul_precision())
train(TrainConfig(model="cnn", epochs=1, limit=2000, device="cuda", out="$WORK/h", quiet=True), log=lambda _: None)
model = rebuild_model(load_checkpoint(Path("$WORK/h/cnn/checkpoint.pt"))).cpu().eval()
d = write_model_dir(Path("$WORK/h/dir"), model, "torchscript")
digits = load_mnist(log=lambda _: None).test_images[:512]
rows = [{"body": png_bytes(x)} for x in digits]
out = {}
for gpu in (None, 0):
    h = DigitHandler(); ctx = make_context(d, gpu_id=gpu); h.initialize(ctx)
    print("device", h.device, "| precision", torch.get_float32_matmul_precision(), "| cudnn.allow_tf32", torch.backends.cudnn.allow_tf32)
    out[gpu] = np.array([a.body["probabilities"] for a in run_batch(h, ctx, rows)])
print(f"max |p_cuda - p_cpu| {np.abs(out[0] - out[None]).max():.3g} | argmax agreement {(out[0].argmax(1) == out[None].argmax(1)).mean():.4f}")
PY
}
{ setup || exit 1; follow_up; gpu_tests; section "done"; } 2>&1 | tee "$OUT/check2.log"
