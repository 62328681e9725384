"""Print what the paper's patch grid and labelling rule give the shared real data sets.

Run from the repository root:  python examples/inspect_shared_data.py [DATA_DIR]
"""

import sys
from pathlib import Path

from featurecache import LabelRule, PatchGrid, read_dataset
from featurecache.summary import summarize

data = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "data")
for name, root, split in [("VOC sample", data / "voc2012-sample" / "VOC2012", "trainval"),
                          ("BCCD", data / "bccd", "trainval")]:
    images = read_dataset(root, split=split)
    for grid in (PatchGrid(), PatchGrid(scales=(1, 1.3, 1.6, 2, 2.4))):
        print(summarize(images, grid=grid, rule=LabelRule(), name=name).to_text(), end="\n\n")
