"""The method objects, one module per family, registered by the table's ``impl`` key.

``linear`` (timm's head: the probe, full fine-tuning, VPT, adapters, ConvPass, ILA), ``pooling``
(IFA, MPN-COV, VQT), ``aggregator`` (TransFG, FFVT), ``two_pass`` (GLSim, RAMS), ``cal``, ``simtrans``, ``clca`` (around the backbone's token reduction), ``lora``
(LoRA, DoRA, GLoRA and ILA with LoRA, through peft, which only that module imports, when such a
model is built), ``ssf`` (SSF, BitFit). A plugin's
row names its class as ``"package.module:Class"``; it is imported here, when a model is built, never
when recipes load. `build_method` is the one place a row becomes an object.
"""

from __future__ import annotations

import importlib

import torch

from ...errors import RecipeError
from ...methods import MethodSpec, method_spec
from ...recipe import ModelConfig
from .aggregator import FFVT, TransFG
from .base import Method, PatchPanel, Selection, StreamEdit, TrainStep
from .cal import CAL
from .clca import CLCA
from .linear import LinearHead
from .lora import DoRA, GLoRA, LoRA
from .plan import MethodPlan, method_plan
from .pooling import IFA, VQT, MPNCov
from .simtrans import SimTrans
from .ssf import SSF, BitFit
from .two_pass import RAMS, GLSim

#: The table's ``impl`` keys -> the classes of the built-in method objects.
REGISTRY: dict[str, type[Method]] = {
    "linear": LinearHead, "ifa": IFA, "mpncov": MPNCov, "vqt": VQT, "transfg": TransFG, "ffvt": FFVT,
    "glsim": GLSim, "rams": RAMS, "cal": CAL, "simtrans": SimTrans, "lora": LoRA, "dora": DoRA, "glora": GLoRA,
    "ssf": SSF, "bitfit": BitFit, "clca": CLCA,
}


def method_class(spec: MethodSpec) -> type[Method]:
    """The class that runs a row: a built-in one by key, or a plugin's by import path."""
    if ":" not in spec.impl:
        if spec.impl not in REGISTRY:
            raise RecipeError(f"method {spec.name!r} names impl {spec.impl!r}, which is not a method object "
                              f"(known: {', '.join(REGISTRY)})")
        return REGISTRY[spec.impl]
    module, _, attr = spec.impl.partition(":")
    where = spec.origin or f"method {spec.name!r}"
    try:
        cls = getattr(importlib.import_module(module), attr)
    except Exception as e:  # noqa: BLE001 - a plugin's import may fail in any way
        raise RecipeError(f"{where}: cannot import {spec.impl} ({type(e).__name__}: {e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise RecipeError(f"{where}: {spec.impl} is not a subclass of ufgir_cli.model.methods.Method")
    return cls


def build_method(cfg: ModelConfig) -> Method:
    """The method object of a model config (it takes its settings from ``cfg`` now, once)."""
    spec = method_spec(cfg.method)
    return method_class(spec)(spec, cfg)


_checked: set[str] = set()


def check_plugin(model) -> None:
    """A plugin method's first use in this process: built, it must give (2, C) logits from
    ``model(x)``, a scalar loss and (2, C) logits from the training entry point, and train something.
    Each broken rule is one line naming the entry point and its distribution."""
    spec = model.method.spec
    if spec.name in _checked:
        return
    where, C = spec.origin or f"method {spec.name!r}", model.num_classes
    if not any(p.requires_grad for p in model.parameters()):
        raise RecipeError(f"{where}: the model has no trainable parameters; its spec's trains= must name a part")
    size = model.data_config()["input_size"]
    x, y = torch.randn(2, *size), torch.arange(2) % C
    was_training = model.training
    state = {k: v.clone() for k, v in model.state_dict().items()}  # the check must leave no trace (BatchNorm)
    rng = torch.get_rng_state()
    try:
        with torch.no_grad():
            logits = model.eval()(x)
            step = model.train()(x, y, torch.nn.CrossEntropyLoss())
    except Exception as e:  # noqa: BLE001 - someone else's code: report it in one line
        raise RecipeError(f"{where}: running a batch of 2 failed ({type(e).__name__}: {e})") from None
    finally:
        model.load_state_dict(state)
        torch.set_rng_state(rng)
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, C):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise RecipeError(f"{where}: model(x) must give (2, {C}) logits for a batch of 2, not {got}")
    if not isinstance(step, TrainStep) or step.loss.dim() != 0 or tuple(step.logits.shape) != (2, C):
        raise RecipeError(f"{where}: the training entry point must give TrainStep(scalar loss, (2, {C}) logits)")
    _checked.add(spec.name)


__all__ = ["REGISTRY", "check_plugin", "Method", "MethodPlan", "PatchPanel", "Selection", "StreamEdit", "TrainStep",
           "build_method", "method_class", "method_plan"]
