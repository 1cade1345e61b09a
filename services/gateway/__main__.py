"""`python -m services.gateway`: run the public gateway until SIGTERM."""

from services.gateway.config import GatewayConfig
from services.gateway.service import build
from services.kit.process import run_process

if __name__ == "__main__":
    run_process("gateway", GatewayConfig.from_env, build, lambda c: c.server)
