"""`python -m services.groups`: run the groups service until SIGTERM."""

from services.groups.config import GroupsConfig
from services.groups.service import build
from services.kit.process import run_process

if __name__ == "__main__":
    run_process("groups", GroupsConfig.from_env, build, lambda c: c.server)
