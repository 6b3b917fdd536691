"""Render the template with its default answers, then train the generated project once.

    python scripts/demo.py [--dest DIR] [-- HYDRA_OVERRIDE ...]

The project is rendered from this working tree, uncommitted changes included, into
`demo-project/` (replaced if this script made it), then `python train.py` runs in it offline.
"""

import argparse
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import copier
from copier.errors import DirtyLocalWarning

REPO = Path(__file__).resolve().parent.parent
MARKER = ".demo-project"  # written into the folder this script renders: the only kind it replaces


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=REPO / "demo-project")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for train.py, after --")
    args = parser.parse_args(argv)
    dest = args.dest.resolve()

    if dest.exists():
        # Only a folder this script made is replaced: a project of yours holds your work.
        if any(dest.iterdir()) and not (dest / MARKER).is_file():
            parser.error(f"{dest} was not made by scripts/demo.py (no {MARKER}); not replacing it")
        shutil.rmtree(dest)
    # vcs_ref="HEAD" renders the working tree: Copier commits uncommitted changes in its
    # temporary clone (it works in a repository with no commits too). Without it Copier would
    # render the latest git tag. Outside git the folder is used as it is.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DirtyLocalWarning)
        copier.run_copy(str(REPO), dest, defaults=True, unsafe=True, vcs_ref="HEAD")
    (dest / MARKER).write_text("Made by scripts/demo.py, which replaces this folder each run.\n")

    command = [sys.executable, "train.py", *args.overrides]
    print(f"\n$ cd {dest} && {' '.join(command)}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(command, cwd=dest, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
