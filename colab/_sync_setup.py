"""Copy the set-up cell (`colab/_setup_cell.py`) and the "Open in Colab" badge into every
notebook of colab/, so that they cannot drift apart.

    python colab/_sync_setup.py           # rewrite the notebooks that differ
    python colab/_sync_setup.py --check   # exit 1 naming the notebooks that differ (the test)

The set-up cell is the notebook's first code cell; its `CPU_DEVICES = N` line is the notebook's
own (how many CPU devices to simulate without an accelerator) and is kept. The badge goes right
under the title of the first (markdown) cell.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = "mmjax/mmjax"  # github owner/name: the badge's link and the set-up cell's clone
MARKER = "# mmjax set-up"
CPU_LINE = re.compile(r"^CPU_DEVICES = \d+.*$", re.M)


def setup_source() -> str:
    with open(os.path.join(HERE, "_setup_cell.py"), encoding="utf-8") as f:
        return f.read().rstrip("\n")


def badge(name: str) -> str:
    url = f"https://colab.research.google.com/github/{REPOSITORY}/blob/main/colab/{name}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def lines(text: str) -> list[str]:
    out = text.split("\n")
    return [line + "\n" for line in out[:-1]] + [out[-1]]


def synced(nb: dict, name: str) -> dict:
    cells = nb["cells"]
    code = [i for i, c in enumerate(cells) if c["cell_type"] == "code"]
    setup = setup_source()
    if code and "".join(cells[code[0]]["source"]).startswith(MARKER):
        old = "".join(cells[code[0]]["source"])
        own = CPU_LINE.search(old)
        if own:
            setup = CPU_LINE.sub(own.group(0), setup, count=1)
        cells[code[0]]["source"] = lines(setup)
    else:
        cell = {"cell_type": "code", "execution_count": None, "id": "mmjax-setup", "metadata": {},
                "outputs": [], "source": lines(setup)}
        cells.insert(code[0] if code else len(cells), cell)
    title = cells[0]
    kept = [line for line in "".join(title["source"]).split("\n")
            if not line.startswith("[![Open In Colab]")]
    head, rest = kept[0], "\n".join(kept[1:]).strip("\n")
    title["source"] = lines(f"{head}\n\n{badge(name)}" + (f"\n\n{rest}" if rest else ""))
    return nb


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path in sorted(glob.glob(os.path.join(HERE, "*.ipynb"))):
        with open(path, encoding="utf-8") as f:
            before = f.read()
        nb = synced(json.loads(before), os.path.basename(path))
        after = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
        if after != before:
            stale.append(os.path.basename(path))
            if not check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(after)
    if stale:
        verb = "differ from" if check else "synced with"
        print(f"{', '.join(stale)} {verb} colab/_setup_cell.py", file=sys.stderr)
        if check:
            print("run: python colab/_sync_setup.py", file=sys.stderr)
    return 1 if check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
