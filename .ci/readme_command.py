"""Print one of the README's two commands, read out of README.md, so that CI runs exactly what a newcomer copies.

Usage: python3 .ci/readme_command.py main|test. The command is the ```bash block that follows the line
``<!-- ci: NAME command ...-->``; its backslash-continued lines are joined as bash would join them.
"""

import pathlib
import re
import sys


def readme_command(name: str, readme: str) -> str:
    marker = re.search(rf"^<!-- ci: {re.escape(name)} command\b.*?-->\s*\n```bash\n(.*?)\n```", readme, re.M | re.S)
    if marker is None:
        raise SystemExit(f"README.md has no '<!-- ci: {name} command -->' marker followed by a ```bash block")
    return marker.group(1).replace("\\\n", " ").strip()


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("main", "test"):
        raise SystemExit("usage: readme_command.py main|test")
    root = pathlib.Path(__file__).resolve().parents[1]
    print(readme_command(sys.argv[1], (root / "README.md").read_text(encoding="utf-8")))
