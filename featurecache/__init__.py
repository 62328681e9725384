"""featurecache: cache frozen-CNN patch features once, then train and compare many heads fast."""

__version__ = "0.2.0"

import os as _os  # noqa: E402

# Threads that spin at OpenMP barriers collapse throughput on oversubscribed cores: beside two
# busy processes torch eager kept 40% of its idle speed, 61% with passive waiting (beside one,
# 43% and 36%: within the spread of those runs; idle, no change; docs/performance.md). It
# must be set before torch loads its OpenMP runtime, hence here (it has no effect when torch
# was imported first, and child processes inherit it); a value the user set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from featurecache.datasets import DatasetError, ImageRecord, ImageSet, read_dataset  # noqa: E402
from featurecache.errors import FeaturecacheError  # noqa: E402
from featurecache.patches import AMBIGUOUS, BACKGROUND, LabelRule, PatchGrid  # noqa: E402

__all__ = [
    "AMBIGUOUS",
    "BACKGROUND",
    "DatasetError",
    "FeaturecacheError",
    "ImageRecord",
    "ImageSet",
    "LabelRule",
    "PatchGrid",
    "__version__",
    "export",
    "load_head",
    "read_dataset",
    "report",
]


def __getattr__(name: str):
    # load_head lives in featurecache.predict and export in featurecache.deploy, which import torch:
    # import them on first use,
    # by name, so that `import featurecache` (and the command line's --help) stays light.
    if name == "load_head":
        import importlib

        return importlib.import_module("featurecache.predict").load_head
    if name == "report":  # the same for the report page (featurecache.pages)
        import importlib

        return importlib.import_module("featurecache.pages").report
    if name == "export":  # featurecache.deploy imports torch too
        import importlib

        return importlib.import_module("featurecache.deploy").export
    raise AttributeError(f"module 'featurecache' has no attribute {name!r}")
