"""`python -m services.gateway`: serve the gateway tier (configured by GATEWAY_* variables)."""

from services.gateway.config import GatewayConfig
from services.gateway.servicer import GatewayTier
from tiermesh.kit.server import run

if __name__ == "__main__":
    run("gateway", GatewayConfig, GatewayTier)
