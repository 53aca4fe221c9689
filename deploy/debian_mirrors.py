"""Print the apt sources for a Debian base image, from the mirrors this machine's apt uses.

    python3 deploy/debian_mirrors.py SUITE [SOURCES_FILE...]

deploy/build-image.sh feeds the output to mmdebstrap, so the image is made from whatever
Debian mirror the machine already reaches (no mirror is named in this repository). The files
default to /etc/apt/sources.list and /etc/apt/sources.list.d/*.list and *.sources, in either
format (one-line or deb822). Only Debian's own entries count: type `deb`, component `main`,
and a suite that is a Debian codename or alias, possibly with -updates, -security or
-backports (third-party repositories such as a vendor's `bookworm stable` are left out). The
host may run another release than SUITE: its mirror is reused with SUITE's name.

Output, one-line format: SUITE and SUITE-updates from the main mirror, SUITE-security from
the security mirror when the machine has one. DEBIAN_MIRROR and DEBIAN_SECURITY_MIRROR, when
set, replace what the files say. Exits 1, saying so, when no Debian mirror is found.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

CODENAMES = {
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "oldoldstable",
    "oldstable",
    "stable",
    "testing",
    "unstable",
}
DEFAULT_FILES = [
    "/etc/apt/sources.list",
    *sorted(glob.glob("/etc/apt/sources.list.d/*.list")),
    *sorted(glob.glob("/etc/apt/sources.list.d/*.sources")),
]


@dataclass(frozen=True)
class Entry:
    uri: str
    suite: str


def _one_line(text: str) -> Iterator[tuple[list[str], list[str], list[str], list[str]]]:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line, count=1)  # [signed-by=... arch=...]
        words = shlex.split(line)
        if len(words) >= 3:
            yield [words[0]], [words[1]], [words[2]], words[3:]


def _deb822(text: str) -> Iterator[tuple[list[str], list[str], list[str], list[str]]]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1].isspace() and key:  # a continuation line
                fields[key] += " " + raw.strip()
            elif ":" in raw:
                key, value = raw.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        yield (
            fields.get("types", "").split(),
            fields.get("uris", "").split(),
            fields.get("suites", "").split(),
            fields.get("components", "").split(),
        )


def debian_entries(files: Iterable[str]) -> list[Entry]:
    entries = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError:
            continue
        parse = _deb822 if path.endswith(".sources") else _one_line
        for types, uris, suites, components in parse(text):
            if "deb" not in types or "main" not in components:
                continue
            for suite in suites:
                codename = re.sub(r"-(updates|security|backports)$", "", suite.rstrip("/"))
                if codename in CODENAMES:
                    entries.extend(Entry(uri.rstrip("/"), suite) for uri in uris)
    return entries


def sources(suite: str, files: list[str], env: dict[str, str]) -> list[str]:
    entries = debian_entries(files)
    main = env.get("DEBIAN_MIRROR") or next((e.uri for e in entries if "-" not in e.suite), None)
    security = env.get("DEBIAN_SECURITY_MIRROR") or next(
        (e.uri for e in entries if e.suite.endswith("-security")), None
    )
    if main is None:
        raise SystemExit(
            "no Debian mirror in the machine's apt sources "
            f"({', '.join(files) or 'none found'}): set DEBIAN_MIRROR"
        )
    lines = [f"deb {main} {suite} main", f"deb {main} {suite}-updates main"]
    if security:
        lines.append(f"deb {security} {suite}-security main")
    return lines


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    suite, files = argv[0], argv[1:] or DEFAULT_FILES
    print("\n".join(sources(suite, files, dict(os.environ))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
