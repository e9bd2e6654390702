"""Build the intent router's ONNX model from the labelled data set it ships with.

How to rebuild (scikit-learn and skl2onnx come with the `router-build` extra):

    pip install 'edge-agent-mesh[router-build]'
    python -m nodes.router.build

It reads `nodes/router/data/intents.csv` (text, label, split, difficulty; the
split is fixed in the file, so every build holds out the same requests), picks
the features and the regularisation by 5-fold cross-validation on the training
rows only, fits, converts the whole pipeline to ONNX with a string input (ONNX
Runtime does the tokenising, TF-IDF and logistic regression), checks that ONNX
Runtime agrees with scikit-learn on every row, and measures accuracy on the
held-out rows with ONNX Runtime: the numbers are those of the model a node
serves. It writes `nodes/router/intent_router.onnx` and the section
`## Intent router` of `docs/BENCHMARKS.md`.

Why character n-grams without lowercasing: they convert to ONNX exactly (word
n-grams and sublinear TF do not: skl2onnx's tokeniser differs from
scikit-learn's on bigrams and non-ASCII words), and ONNX Runtime's lowercasing
needs an installed locale that minimal edge images lack. Training on a
lowercased copy of every example keeps the model robust to lowercase input.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import itertools
import json
import logging
import pathlib
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nodes.router import DATA_PATH, LABELS, METADATA_LABELS, METADATA_TASK, MODEL_PATH
from nodes.router._markdown import update_file_section
from nodes.router.metrics import (
    Example,
    accuracy,
    confusion,
    confusion_table,
    coverage_at,
    load_examples,
)

logger = logging.getLogger(__name__)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCHMARKS_PATH = REPO_ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Intent router"
SUBSECTION = "### Held-out accuracy of the ONNX model"
CONFIDENCE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8)


@dataclass(frozen=True)
class Candidate:
    """One configuration tried by cross-validation."""

    max_char_ngram: int
    word_unigrams: bool
    c: float

    def describe(self) -> str:
        words = " + word unigrams" if self.word_unigrams else ""
        return f"char 1-{self.max_char_ngram}-grams{words}, C={self.c:g}"


# Word unigrams on top of character n-grams never won in cross-validation; the
# option stays so that a different data set can try them.
CANDIDATES = tuple(Candidate(n, False, c) for n, c in itertools.product((4, 5), (3.0, 10.0, 30.0)))


@dataclass(frozen=True)
class BuildResult:
    candidate: Candidate
    cv_accuracy: float
    heldout_accuracy: float
    hard_accuracy: float
    n_train: int
    n_test: int
    n_hard: int
    per_label: dict[str, float]
    confusion_markdown: str
    coverage: list[Any]
    model_bytes: int
    data_sha256: str
    mean_latency_ms: float


def _require_build_tools() -> None:
    missing = [
        m for m in ("sklearn", "skl2onnx", "onnxruntime") if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise SystemExit(
            f"missing {', '.join(missing)}; install the build extra: "
            "pip install 'edge-agent-mesh[router-build]'"
        )


def make_pipeline(candidate: Candidate) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    features = [
        (
            "chars",
            TfidfVectorizer(
                analyzer="char", ngram_range=(1, candidate.max_char_ngram), lowercase=False
            ),
        )
    ]
    if candidate.word_unigrams:
        # An explicit ASCII pattern: ONNX Runtime's regex engine reads \w and \b as ASCII only.
        features.append(
            (
                "words",
                TfidfVectorizer(
                    analyzer="word", lowercase=False, token_pattern=r"[A-Za-z0-9_]{2,}"
                ),
            )
        )
    return Pipeline(
        [
            ("features", FeatureUnion(features)),
            ("classifier", LogisticRegression(C=candidate.c, max_iter=5000)),
        ]
    )


def with_lowercase_copies(examples: Sequence[Example]) -> tuple[list[str], list[str]]:
    """Texts and labels, plus a lowercased copy of each text that is not lowercase already."""
    texts, labels = [], []
    for example in examples:
        texts.append(example.text)
        labels.append(example.label)
        if example.text.lower() != example.text:
            texts.append(example.text.lower())
            labels.append(example.label)
    return texts, labels


def cross_validate(candidate: Candidate, train: Sequence[Example], folds: int = 5) -> float:
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    gold = [e.label for e in train]
    scores = []
    for fit_index, check_index in splitter.split([e.text for e in train], gold):
        texts, labels = with_lowercase_copies([train[i] for i in fit_index])
        pipeline = make_pipeline(candidate).fit(texts, labels)
        predicted = pipeline.predict([train[i].text for i in check_index])
        scores.append(accuracy(list(predicted), [gold[i] for i in check_index]))
    return sum(scores) / len(scores)


def to_onnx_model(pipeline: Any, data_sha256: str) -> Any:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import StringTensorType

    classifier = pipeline.steps[-1][1]
    with warnings.catch_warnings():
        # skl2onnx warns that char analyzers "may not work"; the build checks they do.
        warnings.simplefilter("ignore", UserWarning)
        model = to_onnx(
            pipeline,
            initial_types=[("text", StringTensorType([None, 1]))],
            options={id(classifier): {"zipmap": False}},
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
    model.graph.name = "intent-router"
    model.doc_string = (
        "Intent router: a request's text -> customer-service, technical-support "
        f"or scheduling. Built by `python -m nodes.router.build` from "
        f"intents.csv (sha256 {data_sha256[:16]})."
    )
    for key, value in (
        (METADATA_LABELS, json.dumps([str(c) for c in classifier.classes_])),
        (METADATA_TASK, "text-classification"),
        ("edgemesh.data_sha256", data_sha256),
    ):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def _session(model_bytes: bytes) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _run(session: Any, texts: Sequence[str]) -> tuple[list[str], list[list[float]]]:
    import numpy

    labels, probabilities = session.run(
        None, {"text": numpy.array(list(texts), dtype=object).reshape(-1, 1)}
    )
    return [str(x) for x in labels], probabilities.tolist()


def build(data_path: pathlib.Path, output_path: pathlib.Path) -> BuildResult:
    examples = load_examples(data_path)
    data_sha256 = hashlib.sha256(data_path.read_bytes()).hexdigest()
    train = [e for e in examples if e.split == "train"]
    test = [e for e in examples if e.split == "test"]
    logger.info("%d training and %d held-out requests", len(train), len(test))

    scored = []
    for candidate in CANDIDATES:
        score = cross_validate(candidate, train)
        logger.info("cross-validation %.3f  %s", score, candidate.describe())
        scored.append((score, -candidate.max_char_ngram, -candidate.c, candidate))
    # Best score; on a tie the smaller model (shorter n-grams), then the stronger regularisation.
    best_score, _, _, best = max(scored, key=lambda s: (s[0], s[1], s[2]))

    texts, labels = with_lowercase_copies(train)
    pipeline = make_pipeline(best).fit(texts, labels)
    model = to_onnx_model(pipeline, data_sha256)
    model_bytes = model.SerializeToString()
    session = _session(model_bytes)

    every_text = [e.text for e in examples]
    onnx_labels, _ = _run(session, every_text)
    disagreements = [
        t
        for t, o, s in zip(every_text, onnx_labels, pipeline.predict(every_text), strict=True)
        if o != s
    ]
    if disagreements:
        raise SystemExit(
            f"ONNX Runtime and scikit-learn disagree on {len(disagreements)} "
            f"request(s), e.g. {disagreements[0]!r}; the model was not written"
        )

    began = time.perf_counter()
    for example in test:  # one request at a time, as a node classifies them
        _run(session, [example.text])
    mean_latency_ms = (time.perf_counter() - began) * 1000 / len(test)
    predicted, probabilities = _run(session, [e.text for e in test])
    gold = [e.label for e in test]
    order = json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_LABELS))
    confidences = [max(row) for row in probabilities]
    correct = [p == g for p, g in zip(predicted, gold, strict=True)]
    hard = [i for i, e in enumerate(test) if e.difficulty == "hard"]
    per_label = {
        label: accuracy(
            [predicted[i] for i, g in enumerate(gold) if g == label],
            [g for g in gold if g == label],
        )
        for label in LABELS
    }

    output_path.write_bytes(model_bytes)
    return BuildResult(
        candidate=best,
        cv_accuracy=best_score,
        heldout_accuracy=accuracy(predicted, gold),
        hard_accuracy=accuracy([predicted[i] for i in hard], [gold[i] for i in hard]),
        n_train=len(train),
        n_test=len(test),
        n_hard=len(hard),
        per_label=per_label,
        confusion_markdown=confusion_table(confusion(predicted, gold, order), order),
        coverage=coverage_at(confidences, correct, CONFIDENCE_THRESHOLDS),
        model_bytes=len(model_bytes),
        data_sha256=data_sha256,
        mean_latency_ms=mean_latency_ms,
    )


def format_report(result: BuildResult) -> str:
    lines = [
        "Built and measured by `python -m nodes.router.build` (numbers from ONNX Runtime, the "
        "model a node serves).",
        "",
        f"- Data: `nodes/router/data/intents.csv` (sha256 `{result.data_sha256[:16]}`), "
        f"{result.n_train} training and {result.n_test} held-out requests; the split is fixed in "
        f"the file. {result.n_hard} held-out requests are marked hard (misleading keywords, e.g. "
        '"book a technician" is scheduling, "the booking app won\'t load" is technical-support).',
        f"- Model: {result.candidate.describe()}, logistic regression; chosen by 5-fold "
        f"cross-validation on the training split ({result.cv_accuracy:.1%}); "
        f"`nodes/router/intent_router.onnx`, {result.model_bytes / 1024:.0f} KiB.",
        f"- **Held-out accuracy: {result.heldout_accuracy:.1%}** "
        f"({round(result.heldout_accuracy * result.n_test)}/{result.n_test}); on the hard ones "
        f"{result.hard_accuracy:.1%}.",
        "- Per label: " + ", ".join(f"{k} {v:.1%}" for k, v in result.per_label.items()) + ".",
        f"- Mean time per request, one at a time, 1 thread: {result.mean_latency_ms:.2f} ms.",
        "",
        result.confusion_markdown,
        "",
        "Confidence (the top probability) against accuracy, for choosing an escalation threshold:",
        "",
        "| confidence at least | share of requests | accuracy among them |",
        "|---|---|---|",
    ]
    lines += [
        f"| {c.threshold:.1f} | {c.covered:.1%} | {c.accuracy:.1%} |" for c in result.coverage
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nodes.router.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=pathlib.Path, default=DATA_PATH)
    parser.add_argument("--output", type=pathlib.Path, default=MODEL_PATH)
    parser.add_argument(
        "--benchmarks",
        type=pathlib.Path,
        default=BENCHMARKS_PATH,
        help="Markdown file whose '## Intent router' section is rewritten",
    )
    parser.add_argument("--no-report", action="store_true", help="do not touch the benchmarks file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _require_build_tools()
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    # One BLAS thread: on small shared machines the solver is 30x slower with more.
    with threadpool_limits(limits=1):
        result = build(args.data, args.output)
    report = format_report(result)
    print(report)
    print(f"\nwrote {args.output} ({result.model_bytes} bytes)")
    if not args.no_report:
        update_file_section(args.benchmarks, [SECTION], SUBSECTION, report)
        print(f"updated {args.benchmarks}: {SECTION} / {SUBSECTION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
