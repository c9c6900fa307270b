"""A small real model zoo to merge: a base LM trained here and experts fine-tuned from it, with lm-eval tasks.

`build_zoo(dir, size, seed)` builds one; `load_zoo(dir)` reads it back with absolute paths.
"""

from pipeline.zoo.build import PRESETS, ZooSize, build_zoo
from pipeline.zoo.manifest import Zoo, ZooManifest, load_zoo

__all__ = ["PRESETS", "Zoo", "ZooManifest", "ZooSize", "build_zoo", "load_zoo"]
