"""The intent router: a small ONNX text classifier that picks the agent for a request.

The model (`intent_router.onnx`, built by `python -m nodes.router.build` from
`data/intents.csv`) takes one string tensor and does everything itself inside
ONNX Runtime: character n-gram TF-IDF, then logistic regression. It returns the
label and the probability of every label. A node serves it through the ONNX
Runtime backend under the bundled alias `intent-router`.

Nothing here imports onnxruntime or scikit-learn: this module only says where
things are.
"""

from __future__ import annotations

import pathlib

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
ROUTER_ALIAS = "intent-router"
MODEL_PATH = PACKAGE_DIR / "intent_router.onnx"
DATA_PATH = PACKAGE_DIR / "data" / "intents.csv"
# The labels are the names of the demo agents a routed request goes to.
LABELS = ("customer-service", "technical-support", "scheduling")
# Keys of the metadata the build writes into the ONNX model.
METADATA_LABELS = "edgemesh.labels"  # JSON list, in the order of the probabilities output
METADATA_TASK = "edgemesh.task"  # "text-classification"

__all__ = ["DATA_PATH", "LABELS", "METADATA_LABELS", "METADATA_TASK", "MODEL_PATH", "ROUTER_ALIAS"]
