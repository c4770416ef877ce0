"""Write requirements-lock.txt from a `pip install --dry-run --report` resolution (run by `make lock`).

The lock is a pip constraints file: every package the resolution installs, pinned, plus the pip that resolved
it. Installing with `-c requirements-lock.txt` gives the same versions on a laptop, in CI and on cluster nodes,
whatever the package index holds that day and whatever pip the machine has.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata

from packaging.utils import canonicalize_name

HEADER = """\
# The dependency lock: a pip constraints file, every package of one resolution of artfuse with the extras
# {extras}, on Python {python} ({machine}). Regenerate with `make lock` after changing pyproject.toml's
# dependencies (or to take newer releases); tests/test_lock.py checks it against pyproject and cluster/.
# Install with it: pip install -c requirements-lock.txt -e '.[{extras}]'
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("report", help="the JSON written by pip install --dry-run --report")
    parser.add_argument("out", help="the lock file to write")
    parser.add_argument("--extras", required=True, help="the extras that were resolved, comma-separated")
    parser.add_argument("--project", default="artfuse", help="the project itself, left out of the lock")
    args = parser.parse_args()

    with open(args.report) as f:
        report = json.load(f)
    pins = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in report["install"]
        if canonicalize_name(item["metadata"]["name"]) != canonicalize_name(args.project)
    }
    if not pins:
        print(f"{args.report} installs nothing besides {args.project}: not a resolution to lock", file=sys.stderr)
        return 1
    pins["pip"] = metadata.version("pip")
    header = HEADER.format(extras=args.extras, python=platform.python_version(), machine=platform.machine())
    with open(args.out, "w") as f:
        f.write(header)
        f.writelines(f"{name}=={version}\n" for name, version in sorted(pins.items()))
    print(f"{args.out}: {len(pins)} packages pinned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
