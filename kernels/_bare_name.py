"""What `import kernels` gets when a source checkout's root is on sys.path (`python -m ...` or `python -c` from
the root): this folder, under the bare name that belongs to the Hugging Face kernels-hub package, which
transformers ≥ 5 installs and imports. `hand_over` gives the name to that package, or refuses."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(init_file: str) -> None:
    """Replace sys.modules["kernels"] (this folder) with the installed kernels package found on sys.path
    without the checkout's root; ImportError when none is installed."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(init_file)))
    path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"'kernels' resolved to unigrpo's source folder {os.path.dirname(init_file)} (the checkout "
                          "root is on sys.path) and no kernels package is installed; unigrpo's ops are "
                          "`unigrpo_kernels`")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)
