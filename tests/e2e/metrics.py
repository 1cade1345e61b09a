"""Reading a service process's Prometheus metrics in tests."""

from __future__ import annotations

import urllib.request


def scrape(port: int) -> dict[str, float]:
    """The samples of a /metrics page, keyed by name and labels as printed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def rpcs(samples: dict[str, float], method: str, codes: tuple[str, ...] = ("OK",)) -> float:
    """How many calls of `method` (/package.Service/Method) ended with one of `codes`."""
    return sum(
        samples.get(f'groupchat_rpc_requests_total{{code="{code}",method="{method}"}}', 0.0)
        for code in codes
    )
