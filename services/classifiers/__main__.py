"""`python -m services.classifiers`: serve the classifiers tier (configured by CLASSIFIERS_* variables)."""

from services.classifiers.config import ClassifiersConfig
from services.classifiers.servicer import ClassifiersTier
from tiermesh.kit.server import run

if __name__ == "__main__":
    run("classifiers", ClassifiersConfig, ClassifiersTier)
