"""Class-conditional FID protocol of flowdistill.eval.image_eval (``labels=``): the labels each
protocol hands the sampler, that they change the metric the way class conditioning should, and
that the floor is the unconditional protocol's."""

from __future__ import annotations

import pytest
import torch

from flowdistill.config import DataSpec
from flowdistill.data.digits import digits_tensors
from flowdistill.data.registry import reference_images
from flowdistill.errors import ConfigError
from flowdistill.eval.image_eval import class_labels, image_sweep


def test_class_labels_protocols():
    assert class_labels(None, 25, 10) is None
    bal = class_labels("balanced", 25, 10)
    assert torch.equal(bal, torch.arange(25) % 10)
    counts = torch.bincount(bal, minlength=10)
    assert counts.tolist() == [3] * 5 + [2] * 5  # every class floor(n/C) or ceil(n/C) times
    assert torch.equal(class_labels([1, 2, 3], 3, 10), torch.tensor([1, 2, 3]))
    assert torch.equal(class_labels(torch.tensor([9, 0]), 2, 10), torch.tensor([9, 0]))


@pytest.mark.parametrize("labels, n, c, key", [
    ("uniform", 4, 10, "labels must be one of balanced"),
    ("balanced", 4, 0, "num_classes >= 1"),
    ([1, 2], 3, 10, "2 labels given for n=3"),
    ([0, 10], 2, 10, "class ids in [0, num_classes=10)"),
    ([-1, 0], 2, 10, "class ids in [0, num_classes=10)"),
])
def test_class_labels_errors_are_one_line(labels, n, c, key):
    with pytest.raises(ConfigError) as e:
        class_labels(labels, n, c)
    assert key in str(e.value) and "\n" not in str(e.value)


def _oracle_sampler(calls: list):
    """A perfect class-conditional "model": for each requested class a real train image of that
    class (seeded pick); for the null label a train image of any class."""
    imgs, ys = digits_tensors("train", 8)

    def sample(n, nfe, seed, cond=None):
        calls.append(None if cond is None else cond.clone())
        g = torch.Generator().manual_seed(seed)
        if cond is None:
            return imgs[torch.randint(len(imgs), (n,), generator=g)]
        out = torch.empty(n, *imgs.shape[1:])
        for c in cond.unique():
            pool = (ys == c).nonzero().flatten()
            where = (cond == c).nonzero().flatten()
            out[where] = imgs[pool[torch.randint(len(pool), (len(where),), generator=g)]]
        return out
    return sample


def test_balanced_labels_reach_the_sampler_and_matter():
    """Balanced labels give the class-conditional oracle the digits' class mix: FID near the floor
    (within 2× of the null-label oracle's, which draws the same train images without classes),
    while all samples of one class are far off (> 10× the balanced FID: one class is not the test
    split); the floor is the same number in every protocol."""
    real = reference_images(DataSpec(name="digits", image_size=8), 200)
    calls: list = []
    sampler = _oracle_sampler(calls)
    rows = {}
    for name, labels in (("null", None), ("balanced", "balanced"), ("one", [3] * 200)):
        r, _ = image_sweep({name: sampler}, {name: [1]}, real.reference, real.floor, seed=0,
                           feature_extractor=real.feature_extractor, labels=labels, num_classes=10)
        rows[name] = r[0]
    assert calls[0] is None
    assert torch.equal(calls[1], torch.arange(200) % 10)
    assert torch.equal(calls[2], torch.full((200,), 3))
    assert rows["null"]["fid_floor"] == rows["balanced"]["fid_floor"] == rows["one"]["fid_floor"]
    assert rows["balanced"]["fid"] < 2 * rows["null"]["fid"]
    assert rows["one"]["fid"] > 10 * rows["balanced"]["fid"]
