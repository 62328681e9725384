"""featurecache: cache frozen-CNN patch features once, then train and compare many heads fast."""

__version__ = "0.1.0"

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
    "read_dataset",
]
