"""Transaction anomaly detection: an Isolation Forest on the project's synthetic transactions.

Features: log amount, hour of day (as a point on a circle), merchant category (one-hot), log of
the amount over the customer's usual amount, and velocity (log of 1 + transactions in 24 h).

scikit-learn trains the forest; a version stores its trees as plain arrays (`forest.npz`, no
pickle) and serving walks all trees at once in NumPy: the same score as `score_samples`, in tens
of microseconds instead of the milliseconds scikit-learn's per-tree Python loop costs for one row.
The threshold is the 99th percentile of scores on held-out normal transactions (at most 1% false
positives there); the detection rate is reported on a separate test split.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from services.classifiers import holdout, synthetic
from services.classifiers.config import ANOMALY
from tiermesh.kit.registry import ModelVersion, Registry, RegistryError

FOREST_FILE = "forest.npz"
HOLDOUT_FILE = "holdout.csv"
MAX_FALSE_POSITIVE_RATE = 0.01
NUMERIC_FEATURES = ("log_amount", "hour_sin", "hour_cos", "log_amount_over_usual", "log_velocity")


def features(
    amount: np.ndarray,
    hour: np.ndarray,
    category: np.ndarray,
    usual_amount: np.ndarray,
    transactions_24h: np.ndarray,
    categories: tuple[str, ...],
) -> np.ndarray:
    """The model's feature matrix; `category` holds names, each one of `categories`."""
    angle = 2 * np.pi * np.asarray(hour, dtype=np.float64) / 24
    index = {name: i for i, name in enumerate(categories)}
    one_hot = np.zeros((len(amount), len(categories)))
    one_hot[np.arange(len(amount)), [index[c] for c in category]] = 1.0
    return np.column_stack(
        [
            np.log(np.asarray(amount, dtype=np.float64) + 1.0),
            np.sin(angle),
            np.cos(angle),
            np.log((np.asarray(amount, dtype=np.float64) + 1.0) / (np.asarray(usual_amount) + 1.0)),
            np.log1p(np.asarray(transactions_24h, dtype=np.float64)),
            one_hot,
        ]
    )


def average_path_length(samples: np.ndarray) -> np.ndarray:
    """c(n): the mean path length of an unsuccessful binary-search-tree lookup among n points."""
    samples = np.asarray(samples, dtype=np.float64)
    result = np.where(samples == 2, 1.0, 0.0)
    big = samples > 2
    result[big] = (
        2.0 * (np.log(samples[big] - 1.0) + np.euler_gamma) - 2.0 * (samples[big] - 1.0) / samples[big]
    )
    return result


class Forest:
    """Isolation trees as padded arrays [tree, node]; `score` is the original paper's s(x, n)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.feature = arrays["feature"]  # -1 at leaves
        self.threshold = arrays["threshold"]
        self.left, self.right = arrays["left"], arrays["right"]
        self.leaf_depth = arrays["leaf_depth"]  # depth + c(samples at the leaf) - 1, as scikit-learn
        self.normaliser = float(arrays["normaliser"])  # trees x c(max_samples)
        self.depth = int(arrays["max_depth"])
        self._trees = np.arange(self.feature.shape[0])

    @classmethod
    def from_sklearn(cls, forest: Any) -> Forest:
        trees = [estimator.tree_ for estimator in forest.estimators_]
        width = max(tree.node_count for tree in trees)
        count = len(trees)
        feature = np.full((count, width), -1, dtype=np.int32)
        threshold = np.zeros((count, width))
        left = np.zeros((count, width), dtype=np.int32)
        right = np.zeros((count, width), dtype=np.int32)
        leaf_depth = np.zeros((count, width))
        # Trees see a column subset (in the order `estimators_features_` lists it) only when
        # max_features < all; scikit-learn decides that from this private attribute too.
        subsampled = forest._max_features != forest.n_features_in_
        for t, (tree, columns) in enumerate(zip(trees, forest.estimators_features_, strict=True)):
            n = tree.node_count
            is_leaf = tree.children_left[:n] == -1
            used = np.asarray(columns)[tree.feature[:n]] if subsampled else tree.feature[:n]
            feature[t, :n] = np.where(is_leaf, -1, used)
            threshold[t, :n] = tree.threshold[:n]
            left[t, :n] = np.where(is_leaf, np.arange(n), tree.children_left[:n])
            right[t, :n] = np.where(is_leaf, np.arange(n), tree.children_right[:n])
            leaf_depth[t, :n] = (
                tree.compute_node_depths()[:n] + average_path_length(tree.n_node_samples[:n]) - 1
            )
        normaliser = count * float(average_path_length(np.array([forest.max_samples_]))[0])
        max_depth = max(tree.max_depth for tree in trees)
        return cls(
            {
                "feature": feature,
                "threshold": threshold,
                "left": left,
                "right": right,
                "leaf_depth": leaf_depth,
                "normaliser": np.array(normaliser),
                "max_depth": np.array(max_depth),
            }
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "feature": self.feature,
            "threshold": self.threshold,
            "left": self.left,
            "right": self.right,
            "leaf_depth": self.leaf_depth,
            "normaliser": np.array(self.normaliser),
            "max_depth": np.array(self.depth),
        }

    def score(self, rows: np.ndarray) -> np.ndarray:
        """Anomaly score in (0, 1] per row: 2 ** -(mean path length / c(max_samples))."""
        # scikit-learn compares float32 features with float64 thresholds; so must we, to agree exactly.
        rows = np.asarray(rows, dtype=np.float32).astype(np.float64)
        scores = np.empty(len(rows))
        for start in range(0, len(rows), 2048):
            chunk = rows[start : start + 2048]
            at = np.arange(len(chunk))[:, None]
            node = np.zeros((len(chunk), len(self._trees)), dtype=np.int32)  # [row, tree]
            for _ in range(self.depth):  # every tree advances one level per step; leaves stay put
                values = chunk[at, np.maximum(self.feature[self._trees, node], 0)]
                go_left = values <= self.threshold[self._trees, node]
                node = np.where(go_left, self.left[self._trees, node], self.right[self._trees, node])
            depth = self.leaf_depth[self._trees, node].sum(axis=1)
            scores[start : start + len(chunk)] = 2.0 ** (-depth / self.normaliser)
        return scores


@dataclasses.dataclass(frozen=True)
class AnomalyScore:
    score: float
    is_anomaly: bool


class AnomalyModel:
    """A published anomaly version, ready to score (blocking calls; run them off the event loop)."""

    def __init__(self, version: ModelVersion, *, check: bool = True) -> None:
        self.version = version
        parameters = version.metadata["parameters"]
        self.categories: tuple[str, ...] = tuple(parameters["categories"])
        self.threshold = float(parameters["threshold"])
        try:
            with np.load(version.artifact(FOREST_FILE)) as stored:
                self.forest = Forest({key: stored[key] for key in stored.files})
        except (OSError, ValueError, KeyError) as error:
            raise RegistryError(
                f"{version.name} {version.version}: unreadable {FOREST_FILE}: {error}"
            ) from None
        if check:
            probe = parameters["probe"]
            got = self.forest.score(np.asarray(probe["rows"]))
            if not np.allclose(got, probe["scores"], atol=1e-9):
                raise RegistryError(
                    f"{version.name} {version.version}: probe transactions do not reproduce the scores "
                    "recorded at training (corrupt forest file?)"
                )

    def score(
        self, amount: float, hour: int, category: str, usual_amount: float, transactions_24h: int
    ) -> AnomalyScore:
        row = features(
            np.array([amount]), np.array([hour]), np.array([category]), np.array([usual_amount]),
            np.array([transactions_24h]), self.categories,
        )  # fmt: skip
        score = float(self.forest.score(row)[0])
        return AnomalyScore(score, score > self.threshold)

    def close(self) -> None:
        del self.forest


def _matrix(data: dict[str, np.ndarray], categories: tuple[str, ...]) -> np.ndarray:
    return features(
        data["amount"], data["hour"], data["category"], data["customer_usual_amount"],
        data["transactions_last_24h"], categories,
    )  # fmt: skip


def read_holdout(path: Path) -> dict[str, np.ndarray]:
    return holdout.read(
        path,
        floats=("amount", "customer_usual_amount", "anomaly_score"),
        ints=("hour", "transactions_last_24h", "is_anomaly"),
    )


def evaluate(model: AnomalyModel, holdout: dict[str, np.ndarray]) -> dict[str, Any]:
    """False-positive rate on normal and detection rate on injected anomalies at the threshold."""
    scores = model.forest.score(_matrix(holdout, model.categories))
    flagged = scores > model.threshold
    anomalous = holdout["is_anomaly"] == 1
    return {
        "transactions": len(scores),
        "anomalies": int(anomalous.sum()),
        "threshold": round(model.threshold, 6),
        "false_positive_rate": round(float(flagged[~anomalous].mean()), 4),
        "detection_rate": round(float(flagged[anomalous].mean()), 4),
    }


def train(
    registry: Registry,
    *,
    seed: int = 11,
    rows: int = 40_000,
    holdout_rows: int = 20_000,
    trees: int = 200,
    changelog: str = "",
    make_latest: bool = False,
) -> ModelVersion:
    """Fit on unlabelled transactions, set the threshold on held-out normal ones, test, publish."""
    from sklearn.ensemble import IsolationForest
    from tqdm import tqdm

    categories = synthetic.CATEGORIES
    with tqdm(total=4, desc="anomaly: isolation forest", unit="step") as bar:
        # Three disjoint samples: fit (labels unused), calibrate the threshold, test.
        fit = synthetic.transactions(rows, seed=seed)
        calibration = synthetic.transactions(holdout_rows, seed=seed + 1)
        test = synthetic.transactions(holdout_rows, seed=seed + 2)
        bar.update()
        sklearn_forest = IsolationForest(n_estimators=trees, max_samples=256, random_state=seed)
        sklearn_forest.fit(_matrix(fit, categories))
        forest = Forest.from_sklearn(sklearn_forest)
        bar.update()
        normal = calibration["is_anomaly"] == 0
        calibration_scores = forest.score(_matrix(calibration, categories)[normal])
        # The score of the 1%-from-the-top normal transaction: strictly above it is an anomaly.
        threshold = float(np.quantile(calibration_scores, 1 - MAX_FALSE_POSITIVE_RATE, method="higher"))
        bar.update()
        with tempfile.TemporaryDirectory(prefix="tiermesh-anomaly-") as scratch:
            staging = Path(scratch)
            np.savez(staging / FOREST_FILE, **forest.arrays())
            test_matrix = _matrix(test, categories)
            test_scores = forest.score(test_matrix)
            write_holdout(staging / HOLDOUT_FILE, test, test_scores)
            parameters: dict[str, Any] = {
                "categories": list(categories),
                "features": [*NUMERIC_FEATURES, *(f"category={c}" for c in categories)],
                "threshold": threshold,
                "isolation_forest": {"trees": trees, "max_samples": 256, "seed": seed},
                "data": {"generator": "services.classifiers.synthetic", "seed": seed, "fit": rows},
                "probe": {"rows": test_matrix[:4].tolist(), "scores": test_scores[:4].tolist()},
            }
            candidate = AnomalyModel(ModelVersion(ANOMALY, "candidate", staging, {"parameters": parameters}))
            metrics = {
                **evaluate(candidate, read_holdout(staging / HOLDOUT_FILE)),
                "calibration_false_positive_rate": round(float((calibration_scores > threshold).mean()), 4),
            }
            candidate.close()
            published = registry.publish(
                ANOMALY,
                staging,
                origin={"trainer": "services.classifiers.anomaly"},
                parameters=parameters,
                metrics=metrics,
                changelog=changelog
                or f"Isolation Forest, {trees} trees, threshold at 1% FPR on held-out normal",
                make_latest=make_latest,
            )
            bar.update()
    return published


def write_holdout(path: Path, data: dict[str, np.ndarray], scores: np.ndarray) -> None:
    columns = ("amount", "merchant", "category", "hour", "customer_usual_amount", "transactions_last_24h")
    holdout.write(
        path,
        {
            **{column: data[column] for column in columns},
            "is_anomaly": data["is_anomaly"].astype(int),
            "anomaly_score": [f"{score:.9f}" for score in scores],
        },
    )
