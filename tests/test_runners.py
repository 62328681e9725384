"""Stage one's compute pieces: the crop cutter and the step clock."""

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from featurecache.runners import PatchRunner, StageClock, iter_batches


class _Net(torch.nn.Module):
    feature_dim = 3

    def forward(self, x):
        return x.mean(dim=(2, 3))


@pytest.mark.parametrize("threads", [2, 3])
def test_crops_cut_over_threads_equal_one_roi_align_call(threads):
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.uniform(0, 255, (1, 3, h, w)).astype(np.float32)) for h, w in ((90, 120), (70, 50))]
    boxes = []
    for im in images:
        h, w = im.shape[-2:]
        x0, y0 = rng.uniform(0, w / 2, 11), rng.uniform(0, h / 2, 11)
        side = rng.uniform(8, min(h, w) / 2, 11)
        boxes.append(torch.from_numpy(np.stack([x0, y0, x0 + side, y0 + side], 1).astype(np.float32)))
    runner = PatchRunner(_Net(), input_size=24, batch_size=16, device=torch.device("cpu"), out_dtype=np.float32)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for pieces in iter_batches(list(zip(images, boxes)), 16):  # one batch spans both images
            got = runner.crops(pieces)
            want = torch.cat([roi_align(im, [b], output_size=24, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
                              for im, b in pieces])
            assert torch.equal(got, want)
        feats = runner.run(list(zip(images, boxes)))
    finally:
        torch.set_num_threads(saved)
    assert feats.shape == (22, 3) and {"crop", "forward"} <= set(runner.clock.seconds)


def test_the_stage_clock_adds_up_each_step_even_when_it_raises():
    clock = StageClock()
    with clock("a"):
        pass
    with pytest.raises(ValueError), clock("a"):
        raise ValueError
    assert set(clock.seconds) == {"a"} and clock.seconds["a"] >= 0
