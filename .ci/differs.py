"""Compare installed versions with constraints.txt, or write constraints.txt with some pins replaced.

  python .ci/differs.py constraints.txt
      prints 'name tested->installed' for every installed distribution whose version differs from its pin (or that
      has no pin); empty output means this environment is the tested set.
  python .ci/differs.py --override OVERRIDES constraints.txt
      prints constraints.txt with the pins named in OVERRIDES replaced by those.
"""

import importlib.metadata
import re
import sys


def _name(s: str) -> str:
    return re.sub(r"[-_.]+", "-", s).lower()


def pins(path: str) -> dict[str, str]:
    out = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[_name(name)] = version.strip()
    return out


def main(argv: list[str]) -> None:
    if argv[:1] == ["--override"]:
        merged = {**pins(argv[2]), **pins(argv[1])}
        print("\n".join(f"{k}=={v}" for k, v in sorted(merged.items())))
        return
    tested = pins(argv[0])
    skip = {"r4b-fast", "torch", "triton", "verl", "pip", "setuptools", "wheel"}  # pinned by the command or by torch
    diffs = []
    for dist in importlib.metadata.distributions():
        name = _name(dist.metadata["Name"])
        if name not in skip and not name.startswith("nvidia-") and tested.get(name) != dist.version:
            diffs.append(f"{name} {tested.get(name, 'unpinned')}->{dist.version}")
    print(" ".join(sorted(diffs)))


if __name__ == "__main__":
    main(sys.argv[1:])
