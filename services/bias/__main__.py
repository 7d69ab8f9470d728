"""`python -m services.bias`: serve the bias tier (configured by BIAS_* variables)."""

from services.bias.config import BiasConfig
from services.bias.servicer import BiasTier
from tiermesh.kit.server import run

if __name__ == "__main__":
    run("bias", BiasConfig, BiasTier)
