"""`python -m services.plaza`: run the plaza service until SIGTERM."""

from services.kit.process import run_process
from services.plaza.config import PlazaConfig
from services.plaza.service import build

if __name__ == "__main__":
    run_process("plaza", PlazaConfig.from_env, build, lambda c: c.server)
