"""The commands a developer or an operator runs against a running suite, run as the
Makefile runs them."""

from __future__ import annotations

import asyncio
import os
import sys

from tools.dev_keys import SIGNING_KEY_FILE
from tools.suite import ROOT, Suite


async def run_tool(suite: Suite, *args: str) -> str:
    """Run `python -m <args>` against the suite, as the Makefile does; returns its output
    and fails unless it exits with 0."""
    code, output = await tool_outcome(suite, *args)
    assert code == 0, output
    return output


# The NATS user each command runs as (the Makefile's: tools.nats_users exec, or the
# command's own fallback to the suite's passwords).
TOOL_USERS = {
    "tools.platform": "platform",
    "tools.seed": "platform",
    "services.plaza.rebuild": "operator",
    "tools.revoke": "operator",
}


async def tool_outcome(suite: Suite, *args: str) -> tuple[int, str]:
    """Run `python -m <args>` against the suite, as the Makefile does: its exit code and
    output."""
    env = {
        **os.environ,
        "GATEWAY_ADDRESS": suite.gateway_address,
        "NATS_URL": suite.nats_url,
        # The tools sign as the suite's issuer: the private key beside its key set.
        "JWT_SIGNING_KEY_FILE": str(suite.public_keys_file.with_name(SIGNING_KEY_FILE)),
    }
    if args[0] in TOOL_USERS:
        env.update(suite.nats_users.env(TOOL_USERS[args[0]]))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


async def doctor_finds_nothing_off(suite: Suite) -> None:
    """`make doctor` on the suite's databases: every stored invariant holds (exit 0)."""
    databases = suite.databases
    await run_tool(
        suite,
        "tools.doctor",
        "--uri",
        suite.mongodb_uri,
        "--groups-db",
        databases["groups"],
        "--messaging-db",
        databases["messaging"],
    )
