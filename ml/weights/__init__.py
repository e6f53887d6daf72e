"""Pinned TorchXRayVision weights: a catalog (data), a verified download, and an installed store of
safetensors + manifest that the server loads without ever unpickling anything.

catalog.py  - catalog.json: release file, URL, size and sha256 per model (null where unpublished)
download.py - HTTP download with resume (Range) and a progress bar
store.py    - checks (size + sha256 before use), the one weights_only read of a release pickle,
              the installed safetensors + manifest, bundles for air-gapped sites, verify
"""
