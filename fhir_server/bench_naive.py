"""The naive baseline for `cxr bench --http`: how a user of the original description would serve it.

One Flask file: TorchXRayVision DenseNet-121, per request a PIL read + xrv.datasets.normalize +
XRayCenterCrop + XRayResizer, the forward pass under torch.no_grad, Flask's threaded server. It is
deliberately NOT optimised (no batching, no thread tuning, skimage resize, no backpressure): it is
the yardstick, not part of the product. Run:  python -m fhir_server.bench_naive --port 5000 --weights-dir DIR
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import torch
import torchvision
import torchxrayvision as xrv
from flask import Flask, jsonify, request
from PIL import Image

app = Flask(__name__)
model = None
transform = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)])


@app.get("/healthz")
def healthz():
    return jsonify(status="ok")


@app.post("/predict")
def predict():
    img = Image.open(io.BytesIO(request.files["image"].read())).convert("L")
    img = xrv.datasets.normalize(np.array(img), 255)
    img = transform(img[None, ...])
    with torch.no_grad():
        out = model(torch.from_numpy(img)[None, ...].float())
    return jsonify({name: float(p) for name, p in zip(model.pathologies, out[0]) if name})


def main() -> None:
    global model
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--weights-dir", required=True)
    args = parser.parse_args()
    model = xrv.models.DenseNet(weights="densenet121-res224-all", cache_dir=args.weights_dir).eval()
    app.run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
