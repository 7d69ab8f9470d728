"""Credit risk: XGBoost on the project's synthetic applications (see synthetic.py).

Returns the probability of default, a risk band (cut-offs belong to the version), and XGBoost's
own per-feature contributions (`pred_contribs`: exact TreeSHAP values in log-odds, which with
the base value add up to the applicant's log-odds). The protected attribute is generated and kept
beside the held-out decisions for the bias tier's audit, but it is never a feature.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from services.classifiers import holdout, synthetic
from services.classifiers.config import CREDIT
from tiermesh.kit.registry import ModelVersion, Registry, RegistryError

FEATURES = synthetic.CREDIT_FEATURES
MODEL_FILE = "model.json"
HOLDOUT_FILE = "holdout_decisions.csv"
# Upper bounds of LOW, MEDIUM and HIGH; above the last is VERY_HIGH.
BAND_CUTOFFS = (0.08, 0.20, 0.40)
BANDS = ("LOW", "MEDIUM", "HIGH", "VERY_HIGH")
# The decision exported for the fairness audit: approve below this probability of default.
APPROVE_BELOW = 0.20


@dataclasses.dataclass(frozen=True)
class Contribution:
    feature: str
    value: float
    contribution: float  # log-odds


@dataclasses.dataclass(frozen=True)
class CreditScore:
    default_probability: float
    band: str
    base_value: float
    contributions: list[Contribution]  # largest magnitude first


class CreditModel:
    """A published credit-risk version, ready to score (blocking calls; run them off the event loop)."""

    def __init__(self, version: ModelVersion, *, check: bool = True) -> None:
        import xgboost as xgb

        self.version = version
        parameters = version.metadata["parameters"]
        self.features: tuple[str, ...] = tuple(parameters["features"])
        self.cutoffs = tuple(parameters["band_cutoffs"])
        self.booster = xgb.Booster()
        try:
            self.booster.load_model(str(version.artifact(MODEL_FILE)))
        except xgb.core.XGBoostError as error:
            reason = str(error).splitlines()[0]  # XGBoost appends a native stack trace
            raise RegistryError(
                f"{version.name} {version.version}: unreadable {MODEL_FILE}: {reason}"
            ) from None
        self.booster.set_param({"nthread": 1})  # one applicant per call: threads cost more than they save
        if check:
            probe = parameters["probe"]
            got = [s.default_probability for s in self.score(np.asarray(probe["rows"], dtype=np.float64))]
            if not np.allclose(got, probe["probabilities"], atol=1e-5):
                raise RegistryError(
                    f"{version.name} {version.version}: probe applications do not reproduce the "
                    "probabilities recorded at training (corrupt model file?)"
                )

    def band(self, probability: float) -> str:
        return BANDS[int(np.searchsorted(self.cutoffs, probability, side="right"))]

    def score(self, rows: np.ndarray) -> list[CreditScore]:
        """Scores for rows of feature values in `self.features` order."""
        import xgboost as xgb

        matrix = xgb.DMatrix(rows, feature_names=list(self.features))
        contributions = self.booster.predict(matrix, pred_contribs=True)  # last column: the bias
        margins = contributions.sum(axis=1, dtype=np.float64)
        probabilities = 1.0 / (1.0 + np.exp(-margins))
        scores = []
        for row, values, probability in zip(rows, contributions, probabilities, strict=True):
            order = np.argsort(-np.abs(values[:-1]), kind="stable")
            scores.append(
                CreditScore(
                    default_probability=float(probability),
                    band=self.band(float(probability)),
                    base_value=float(values[-1]),
                    contributions=[
                        Contribution(self.features[i], float(row[i]), float(values[i])) for i in order
                    ],
                )
            )
        return scores

    def close(self) -> None:
        del self.booster


def read_holdout(path: Path) -> dict[str, np.ndarray]:
    """The exported held-out decisions as columns."""
    return holdout.read(path, floats=(*FEATURES, "default_probability"), ints=("defaulted", "approved"))


def evaluate(model: CreditModel, holdout: dict[str, np.ndarray]) -> dict[str, Any]:
    """ROC-AUC and calibration on held-out applications, plus approval rates by protected group."""
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    rows = np.column_stack([holdout[name] for name in model.features])
    probabilities = np.array([s.default_probability for s in model.score(rows)])
    truth = holdout["defaulted"]
    approved = probabilities < APPROVE_BELOW
    groups = holdout[synthetic.PROTECTED_ATTRIBUTE]
    return {
        "applications": len(truth),
        "roc_auc": round(float(roc_auc_score(truth, probabilities)), 4),
        "brier": round(float(brier_score_loss(truth, probabilities)), 4),
        "log_loss": round(float(log_loss(truth, probabilities)), 4),
        "default_rate": round(float(truth.mean()), 4),
        "approval_rate": round(float(approved.mean()), 4),
        "approval_rate_by_group": {
            str(group): round(float(approved[groups == group].mean()), 4) for group in sorted(set(groups))
        },
    }


# XGBoost's settings for the credit model (the seed and threads are added per run).
BOOSTING = {
    "objective": "binary:logistic",
    "eval_metric": "auc",
    "max_depth": 4,
    "eta": 0.05,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "min_child_weight": 5,
    "tree_method": "hist",
}


def train(
    registry: Registry,
    *,
    seed: int = 7,
    rows: int = 40_000,
    holdout_rows: int = 10_000,
    rounds: int = 600,
    changelog: str = "",
    make_latest: bool = False,
) -> ModelVersion:
    """Generate, train with early stopping, evaluate on held-out applications, publish."""
    import xgboost as xgb

    data = synthetic.credit_applications(rows + holdout_rows, seed=seed)
    matrix = np.column_stack([data[name].astype(np.float64) for name in FEATURES])
    settings = {**BOOSTING, "seed": seed, "nthread": 2}
    booster = boost(matrix[:rows], data["defaulted"][:rows], settings, rounds=rounds)
    trees = booster.num_boosted_rounds()
    with tempfile.TemporaryDirectory(prefix="tiermesh-credit-") as scratch:
        staging = Path(scratch)
        booster.save_model(str(staging / MODEL_FILE))
        parameters: dict[str, Any] = {
            "features": list(FEATURES),
            "protected_attribute": synthetic.PROTECTED_ATTRIBUTE,
            "band_cutoffs": list(BAND_CUTOFFS),
            "bands": list(BANDS),
            "approve_below": APPROVE_BELOW,
            "xgboost": {**settings, "trees": trees, "xgboost_version": xgb.__version__},
            "data": {"generator": "services.classifiers.synthetic", "seed": seed, "train": rows},
        }
        candidate = CreditModel(
            ModelVersion(CREDIT, "candidate", staging, {"parameters": parameters}), check=False
        )
        held_out = slice(rows, rows + holdout_rows)
        probabilities = np.array([s.default_probability for s in candidate.score(matrix[held_out])])
        write_holdout(staging / HOLDOUT_FILE, data, held_out, probabilities, candidate)
        parameters["probe"] = {
            "rows": matrix[held_out][:4].tolist(),
            "probabilities": probabilities[:4].round(7).tolist(),
        }
        # Metrics from the file as written: exactly what the tests and the bias tier read back.
        metrics = evaluate(candidate, read_holdout(staging / HOLDOUT_FILE))
        candidate.close()
        return registry.publish(
            CREDIT,
            staging,
            origin={"trainer": "services.classifiers.credit"},
            parameters=parameters,
            metrics=metrics,
            changelog=changelog or f"XGBoost, {trees} trees of depth 4 on {rows} synthetic applications",
            make_latest=make_latest,
        )


def boost(matrix: np.ndarray, defaulted: np.ndarray, settings: dict[str, Any], *, rounds: int) -> Any:
    """An XGBoost booster trained on `matrix`, early-stopped on its last tenth and cut to the best
    round, with a progress bar of the rounds."""
    import xgboost as xgb
    from tqdm import tqdm

    validation = len(matrix) - len(matrix) // 10
    dtrain = xgb.DMatrix(matrix[:validation], label=defaulted[:validation], feature_names=list(FEATURES))
    dcheck = xgb.DMatrix(matrix[validation:], label=defaulted[validation:], feature_names=list(FEATURES))

    class Progress(xgb.callback.TrainingCallback):
        def __init__(self) -> None:
            self.bar = tqdm(total=rounds, desc="credit: boosting", unit="tree")

        def after_iteration(self, model: Any, epoch: int, evals_log: dict) -> bool:
            self.bar.set_postfix(validation_auc=f"{evals_log['validation']['auc'][-1]:.4f}", refresh=False)
            self.bar.update()
            return False

        def after_training(self, model: Any) -> Any:
            self.bar.total = self.bar.n  # early stopping ended it
            self.bar.close()
            return model

    booster = xgb.train(
        settings,
        dtrain,
        num_boost_round=rounds,
        evals=[(dcheck, "validation")],
        early_stopping_rounds=40,
        verbose_eval=False,
        callbacks=[Progress()],
    )
    return booster[: booster.best_iteration + 1]


def write_holdout(
    path: Path, data: dict[str, np.ndarray], rows: slice, probabilities: np.ndarray, model: CreditModel
) -> None:
    """The held-out decisions with the protected attribute, for the bias tier's audit."""
    holdout.write(
        path,
        {
            "application_id": [f"A{index:06d}" for index in range(rows.start, rows.stop)],
            **{name: data[name][rows] for name in FEATURES},
            synthetic.PROTECTED_ATTRIBUTE: data[synthetic.PROTECTED_ATTRIBUTE][rows],
            "defaulted": data["defaulted"][rows],
            "default_probability": [f"{p:.6f}" for p in probabilities],
            "risk_band": [model.band(float(p)) for p in probabilities],
            "approved": (probabilities < APPROVE_BELOW).astype(int),
        },
    )
