"""Seconds per localisation map, side by side: cam maps vs the window maps and their second extraction.

    python benchmarks/bench_maps.py --cache results-work/voc-full.h5 [--images 10] [--head H.pt]

For the first ``--images`` val images of a cache (the VOC sample's, extracted with the default
nine-scale grid by examples/localization.py), measured in one run on the same head:

- ``windows, cached``: the paper's window map of a cached image (patch scores of its cached
  features, per-pixel mean);
- ``cam, cached image``: ``localize``'s default: the dense trunk at the head's scales on the
  image file, every cell scored;
- ``cam, new image``: ``Predictor.localization_map`` on the image file (no extraction);
- ``windows, new image``: ``Predictor.localization_map(method="windows")``, which extracts the
  image's crop patches first — what every map of a new image cost before cam maps;
- ``cam, cached image, runtime R``: the cam map with its trunk run by each installed CPU
  runtime (``--runtime`` of ``localize``; ``auto`` picks the first that agrees with torch).

Prints seconds per image and each row's ratio to the last one.
"""

import argparse
import time
from pathlib import Path

import torch

from featurecache.cache import FeatureCache
from featurecache.heads.registry import FitConfig
from featurecache.heads.trained import TrainedHead
from featurecache.maps import Localizer, MapConfig
from featurecache.predict import Predictor
from featurecache.runtimes import installed_runtimes
from featurecache.train import fit_objective


def timed(fn, items) -> float:
    t0 = time.perf_counter()
    for it in items:
        fn(it)
    return (time.perf_counter() - t0) / len(items)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--head", type=Path, default=None, help="default: a mil head trained on the train split")
    args = ap.parse_args()
    head = (TrainedHead.load(args.head) if args.head else
            fit_objective(args.cache, FitConfig("mil", {}, train_split="train", progress=False)))
    predictor = Predictor(head)
    with FeatureCache(args.cache, split="val") as cache:
        root = Path(cache.attrs["dataset"]["root"])
        positions = list(range(min(args.images, cache.num_images)))
        files = [root / cache.images.path[p] for p in positions]
        n_patches = int(cache.images.patch_count[positions].sum())
        windows = Localizer(head, MapConfig(method="windows"))
        cam = Localizer(head, MapConfig(method="cam"), backbone=predictor.backbone())
        cam.file_map(files[0])  # warm-up: the backbone built and moved once
        rows = {
            "windows, cached": timed(lambda p: windows.cache_map(cache, p), positions),
            "cam, cached image": timed(lambda p: cam.cache_map(cache, p), positions),
            "cam, new image": timed(lambda f: predictor.localization_map(f), files),
            "windows, new image (crop extraction)": timed(lambda f: predictor.localization_map(f, method="windows"),
                                                          files),
        }
        for name in installed_runtimes():
            by = Localizer(head, MapConfig(method="cam", runtime=name), backbone=predictor.backbone())
            by.file_map(files[0])  # warm-up: the runtime built (exported, compiled, probed) once
            rows[f"cam, cached image, runtime {name}"] = timed(lambda p, by=by: by.cache_map(cache, p), positions)
    base = rows["windows, new image (crop extraction)"]
    print(f"{len(files)} images of {args.cache} ({n_patches / len(files):.0f} patches per image, grid scales "
          f"{predictor.grid.scales}), {head.objective} head, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name, s in rows.items():
        print(f"{name:<40} {s:7.2f} s/image   {s / base:5.2f}x")


if __name__ == "__main__":
    main()
