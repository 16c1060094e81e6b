"""Recipe presets shared by every comparison method: the reference's augmentation presets, training
the backbone too, and the loss the training loop actually uses."""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torchvision.transforms import v2

from ufgir_cli.data.datasets import preprocess_for
from ufgir_cli.engine import train as train_module
from ufgir_cli.engine.train import fit
from ufgir_cli.model import build_model
from ufgir_cli.recipe import load_recipe, recipe_from_dict


def _tiny(**sections):
    over = {"model": {"backbone": "vit_tiny_patch16_224", "weights": "none", "image_size": 64, "depth": 2,
                      "method": "linear", **sections.pop("model", {})}, **sections}
    return load_recipe("linear", over)


def test_medium_preset_resolves_to_the_reference_medaugs():
    r = _tiny(data={"augment": "medium"})
    assert (r.optim.label_smoothing, r.model.drop, r.model.drop_path, r.model.drop_path_schedule) == (
        0.1, 0.0, 0.1, "uniform")
    assert recipe_from_dict(r.model_dump(mode="json")) == r  # the resolved recipe reloads as written
    weak = _tiny()
    assert (weak.data.augment, weak.optim.label_smoothing, weak.model.drop, weak.model.drop_path) == ("weak", 0.0, 0.1, 0.0)
    # A key the user sets wins over the preset.
    assert _tiny(data={"augment": "medium"}, optim={"label_smoothing": 0.2}).optim.label_smoothing == 0.2


def test_medium_preset_transforms():
    r = _tiny(data={"augment": "medium"})
    train, evaluate = preprocess_for(r, train=True), preprocess_for(r, train=False)
    assert evaluate.extra is None and preprocess_for(_tiny(), train=True).extra is None
    trivial, erase = train.extra.transforms
    assert isinstance(trivial, v2.TrivialAugmentWide)
    assert isinstance(erase, v2.RandomErasing) and erase.p == 0.3
    assert tuple(erase.scale) == (0.02, 0.4) and tuple(erase.ratio) == (0.3, 3.3)
    assert list(erase.value) == [round(255 * m) for m in r.model.mean]  # normalises to 0, the reference's value
    img = torch.randint(0, 256, (3, 90, 90), dtype=torch.uint8)
    a = train(img, torch.Generator().manual_seed(7))
    b = train(img, torch.Generator().manual_seed(7))
    others = [train(img, torch.Generator().manual_seed(s)) for s in range(8)]
    assert a.shape == (3, 64, 64) and a.dtype == torch.uint8
    assert torch.equal(a, b)  # a function of the per-sample generator: resume sees the same images
    assert any(not torch.equal(a, o) for o in others)


def test_medium_preset_model_has_uniform_stochastic_depth():
    model = build_model(_tiny(data={"augment": "medium"}).model, 5)
    rates = [blk.drop_path1.drop_prob for blk in model.vit.blocks] + [blk.drop_path2.drop_prob for blk in model.vit.blocks]
    assert all(isinstance(blk.drop_path1, DropPath) for blk in model.vit.blocks) and rates == [0.1] * len(rates)
    assert model.drop.p == 0.0


def test_training_uses_the_presets_label_smoothing(small_synthetic, tmp_path, monkeypatch, one_thread):
    seen = []

    class Recording(torch.nn.CrossEntropyLoss):
        def forward(self, logits, target):
            seen.append(self.label_smoothing)
            return super().forward(logits, target)

    monkeypatch.setattr(train_module.torch.nn, "CrossEntropyLoss", Recording)
    r = load_recipe("quickstart", {"data": {"root": str(small_synthetic), "num_workers": 0, "augment": "medium"},
                                   "train": {"epochs": 1, "batch_size": 8}, "eval": {"every": 0}})
    fit(r, tmp_path / "run")
    assert seen and set(seen) == {0.1}


def test_train_backbone_trains_every_parameter_of_any_method():
    frozen = build_model(_tiny(model={"method": "vpt_shallow", "prompt_len": 2}).model, 5)
    r = _tiny(model={"method": "vpt_shallow", "prompt_len": 2, "train_backbone": True})
    model = build_model(r.model, 5)
    assert all(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > \
        10 * sum(p.numel() for p in frozen.parameters() if p.requires_grad)
    assert model.prompts is not None  # the method's own modules are still there
