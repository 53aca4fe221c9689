"""One wrk run (Debian's wrk, 2 threads), read into numbers: the benches' only load tool."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Run:
    rate: float  # requests per second
    total: int  # requests made
    p50: float  # latency percentiles, ms
    p90: float
    p99: float
    non_2xx: int  # answers that were not 2xx or 3xx


def run(url: str, headers: Mapping[str, str], seconds: float, connections: int) -> Run:
    argv = [shutil.which("wrk") or "wrk", "-t2", f"-c{connections}", f"-d{round(seconds)}s",
            "--latency"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    out = subprocess.run([*argv, url], capture_output=True, text=True,  # noqa: S603
                         check=True).stdout
    quantiles = {q: _ms(v) for q, v in re.findall(r"\s(50|90|99)%\s+([\d.]+\w+)", out)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Run(float(_found(r"Requests/sec:\s+([\d.]+)", out)),
               int(_found(r"(\d+) requests in", out)), quantiles["50"], quantiles["90"],
               quantiles["99"], int(errors.group(1)) if errors else 0)


def _found(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"wrk printed no {pattern!r}:\n{text}")
    return match.group(1)


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(\w+)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
