"""`python -m services.messaging`: run the messaging service until SIGTERM."""

from services.kit.process import run_process
from services.messaging.config import MessagingConfig
from services.messaging.service import build

if __name__ == "__main__":
    run_process("messaging", MessagingConfig.from_env, build, lambda c: c.server)
