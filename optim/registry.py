"""Optimizer registry: ``build_optimizer(name, params, **hp)`` with parameter-grouping rules.

Names (lower case): torch.optim -- ``sgd``, ``nesterov``, ``adagrad``, ``rmsprop``, ``adam``, ``adamw``,
``nadam``, ``radam``, ``amsgrad``, ``adafactor``, ``lbfgs``; this package -- ``lars``, ``lamb``,
``sophia``, ``shampoo``, ``ftrl``, ``ista``, ``fista``, ``svrg``, ``saga``; and every optimizer of
``pytorch_optimizer`` as ``po:<name>`` (e.g. ``po:adan``), when that package is installed.

Given an ``nn.Module`` the registry builds param groups:

* ``decay``: ordinary weights;
* ``no_decay``: biases, norm-layer weights and other 1-D/0-D tensors -- weight decay (and the
  L1/L2 of ftrl/ista/fista/svrg/saga) set to 0, ``layer_adaptation=False`` for LARS/LAMB;
* ``embedding``: dense ``nn.Embedding``/``nn.EmbeddingBag`` weights, with ``embedding_lr`` /
  ``embedding_weight_decay`` when given;
* ``sparse_embedding``: embeddings built with ``sparse=True``, routed to ``sparse_optimizer``
  (``sparse_adam`` by default; also ``adagrad``, ``ftrl``, ``sgd``) -- the result is then a
  :class:`~optim.combined.CombinedOptimizer`, still a ``torch.optim.Optimizer``.

Each group carries ``param_names`` so optimizers can report per-layer diagnostics by name.
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .combined import CombinedOptimizer
from .proximal import FISTA, ISTA
from .ftrl import FTRL
from .lamb import LAMB
from .lars import LARS
from .saga import SAGA
from .shampoo import Shampoo
from .sophia import Sophia
from .svrg import SVRG

__all__ = ["build_optimizer", "available_optimizers", "param_groups_for", "REGISTRY_OPTIONS"]


@dataclass(frozen=True)
class _Spec:
    cls: type
    fixed: dict = field(default_factory=dict)      # forced constructor args (amsgrad=True, ...)
    defaults: dict = field(default_factory=dict)   # overridable registry defaults
    reg_keys: tuple = ("weight_decay",)            # zeroed for the no_decay group
    layer_adaptation: bool = False                 # understands the layer_adaptation group flag
    sparse: bool = False                           # accepts sparse gradients
    fused_devices: tuple = ()                      # device types with a torch fused kernel for it
    single_group: bool = False
    own: bool = False


_CPU_CUDA = ("cpu", "cuda")
_SPECS: dict[str, _Spec] = {
    "sgd": _Spec(torch.optim.SGD, fused_devices=_CPU_CUDA),
    "nesterov": _Spec(torch.optim.SGD, fixed={"nesterov": True}, defaults={"momentum": 0.9}, fused_devices=_CPU_CUDA),
    "adagrad": _Spec(torch.optim.Adagrad, sparse=True, fused_devices=("cpu",)),  # torch has no fused CUDA Adagrad,
    "rmsprop": _Spec(torch.optim.RMSprop),
    "adam": _Spec(torch.optim.Adam, fused_devices=_CPU_CUDA),
    "adamw": _Spec(torch.optim.AdamW, fused_devices=_CPU_CUDA),
    "nadam": _Spec(torch.optim.NAdam),
    "radam": _Spec(torch.optim.RAdam),
    "amsgrad": _Spec(torch.optim.Adam, fixed={"amsgrad": True}, fused_devices=_CPU_CUDA),
    "adafactor": _Spec(torch.optim.Adafactor),
    "lbfgs": _Spec(torch.optim.LBFGS, reg_keys=(), single_group=True),
    "lars": _Spec(LARS, layer_adaptation=True, own=True),
    "lamb": _Spec(LAMB, layer_adaptation=True, own=True),
    "sophia": _Spec(Sophia, own=True),
    "shampoo": _Spec(Shampoo, own=True),
    "ftrl": _Spec(FTRL, reg_keys=("l1", "l2"), sparse=True, own=True),
    "ista": _Spec(ISTA, reg_keys=("l1", "l2"), own=True),
    "fista": _Spec(FISTA, reg_keys=("l1", "l2"), own=True),
    "svrg": _Spec(SVRG, reg_keys=("weight_decay", "l1"), own=True),
    "saga": _Spec(SAGA, reg_keys=("weight_decay", "l1"), own=True),
    # sparse-only route (for sparse=True embeddings); not a general-purpose name
    "sparse_adam": _Spec(torch.optim.SparseAdam, reg_keys=(), sparse=True),
}
_PUBLIC = [n for n in _SPECS if n != "sparse_adam"]
_SPARSE_ROUTES = ("sparse_adam", "adagrad", "ftrl", "sgd")

#: keyword arguments understood by build_optimizer itself (not passed to the optimizer)
REGISTRY_OPTIONS = {
    "embedding_lr": "learning rate of embedding tables (dense and sparse); default: lr",
    "embedding_weight_decay": "weight decay of dense embedding tables; default: weight_decay",
    "sparse_optimizer": f"optimizer for sparse=True embeddings: one of {', '.join(_SPARSE_ROUTES)}",
    "sparse_hp": "dict of extra hyperparameters for the sparse optimizer",
    "group_rules": "apply the bias/norm/embedding grouping rules to an nn.Module (default True)",
}

_NORM_TYPES: tuple = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)
_EMB_TYPES = (nn.Embedding, nn.EmbeddingBag)


def _external_names() -> list[str]:
    try:
        import pytorch_optimizer
    except ImportError:  # pragma: no cover - optional dependency
        return []
    return sorted(f"po:{n}" for n in pytorch_optimizer.get_supported_optimizers())


def available_optimizers(include_external: bool = False) -> list[str]:
    """Registry names; ``include_external=True`` adds the ``po:<name>`` pytorch_optimizer entries."""
    names = list(_PUBLIC)
    return names + _external_names() if include_external else names


def _spec(name: str) -> _Spec:
    key = name.strip().lower() if isinstance(name, str) else name
    if isinstance(key, str) and key.startswith("po:"):
        try:
            import pytorch_optimizer
        except ImportError as e:  # pragma: no cover
            raise ValueError(f"optimizer {name!r} needs the pytorch_optimizer package") from e
        try:
            cls = pytorch_optimizer.load_optimizer(key[3:])
        except NotImplementedError as e:
            raise ValueError(f"unknown pytorch_optimizer optimizer {name!r}; valid: "
                             f"{', '.join(_external_names())}") from e
        first = next(iter(list(inspect.signature(cls.__init__).parameters)[1:]), None)
        if first == "model":  # LOMO/AdaLOMO update inside their own backward, AdamMini groups by module names
            raise ValueError(f"optimizer {name!r} is built on the model itself ({cls.__name__}(model, ...)), not on "
                             "parameters: the registry builds optimizers over parameter groups and cannot build it; "
                             "use it from a loop of your own")
        return _Spec(cls)
    spec = _SPECS.get(key) if isinstance(key, str) else None
    if spec is None:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(_PUBLIC)} "
                         "(and po:<name> for pytorch_optimizer, see available_optimizers(include_external=True))")
    return spec


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _str_arg(node: ast.Call) -> str | None:
    arg = node.args[0] if node.args else None
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


@functools.cache
def _kwargs_keys(cls: type) -> tuple[str, ...]:
    """The keys a pytorch_optimizer class really takes through its ``**kwargs``, which most of them
    declare and many ignore: keys its ``__init__`` reads from them (``kwargs.get('use_palm')``), the
    optional group flags its steps read (``group.get('adanorm')``, ``use_gc``, ``cautious``...)
    when ``__init__`` puts the kwargs into the group defaults, and the hyperparameters of an
    optimizer class it builds from them (Magma: AdamW). Read from the source, so that a misspelt
    key is refused instead of silently ignored (or stored as a group key no step reads)."""
    var = next((p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind == p.VAR_KEYWORD), None)
    if var is None:
        return ()
    try:
        init = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    except (OSError, TypeError, SyntaxError):  # pragma: no cover - no source: take no extra key
        return ()
    module = sys.modules.get(cls.__init__.__module__)
    keys: set[str] = set()
    into_defaults = False
    for node in ast.walk(init):
        if isinstance(node, ast.Subscript) and _is_name(node.value, var) and isinstance(node.slice, ast.Constant):
            keys.add(str(node.slice.value))
        elif isinstance(node, ast.Dict) and any(k is None and _is_name(v, var) for k, v in zip(node.keys, node.values)):
            into_defaults = True  # {'lr': lr, ..., **kwargs}: extra group defaults
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and _is_name(node.func.value, var) and node.func.attr == "get":
                if (k := _str_arg(node)) is not None:
                    keys.add(k)
            elif any(kw.arg is None and _is_name(kw.value, var) for kw in node.keywords):
                built = [getattr(module, a.id, None) for a in node.args if isinstance(a, ast.Name)]
                built = [c for c in built if isinstance(c, type) and issubclass(c, Optimizer)]
                if built:
                    keys.update(_valid_hp(_Spec(built[0])))
                else:
                    into_defaults = True  # super().__init__(params, **kwargs) and the like
    if into_defaults:
        for klass in cls.__mro__:
            if not klass.__module__.startswith("pytorch_optimizer"):
                continue
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
            except (OSError, TypeError, SyntaxError):  # pragma: no cover
                continue
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("group")
                        and (k := _str_arg(node)) is not None):
                    keys.add(k)
    return tuple(sorted(keys))


def _valid_hp(spec: _Spec) -> list[str]:
    sig = inspect.signature(spec.cls.__init__)
    names = [n for n, p in sig.parameters.items()
             if n not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if spec.cls.__module__.startswith("pytorch_optimizer"):
        names += [k for k in _kwargs_keys(spec.cls) if k not in names and k not in ("self", "params")]
    return [n for n in names if n not in spec.fixed]


def _construct(name: str, params, **hp) -> Optimizer:
    """Instantiate registry entry ``name`` on ``params`` (groups or tensors), validating ``hp``."""
    spec = _spec(name)
    valid = _valid_hp(spec)
    unknown = [k for k in hp if k not in valid]
    if unknown:
        why = " (it takes no learning rate: it sets its own step size)" if "lr" in unknown else ""
        raise ValueError(f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for optimizer {name!r}{why}; "
                         f"valid: {', '.join(valid)}; registry options: {', '.join(REGISTRY_OPTIONS)}")
    kwargs = {**spec.defaults, **hp, **spec.fixed}
    try:
        return spec.cls(params, **kwargs)
    except (ValueError, TypeError, IndexError) as e:  # IndexError: a too-short tuple (betas=(0.9,), trust_clip=(1,))
        raise ValueError(f"bad hyperparameters for optimizer {name!r} ({e}); valid hyperparameters: "
                         f"{', '.join(valid)}") from e
    except ImportError as e:  # pytorch_optimizer's optional dependencies (po:demo: einops)
        raise ValueError(f"optimizer {name!r} needs a package that is not installed: {e}") from e


def _module_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    groups: dict[str, list] = {"decay": [], "no_decay": [], "embedding": [], "sparse_embedding": []}
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, _EMB_TYPES) and p_name == "weight":
                groups["sparse_embedding" if getattr(mod, "sparse", False) else "embedding"].append((full, p))
            elif isinstance(mod, _NORM_TYPES) or p_name == "bias" or p.ndim <= 1:
                groups["no_decay"].append((full, p))
            else:
                groups["decay"].append((full, p))
    return groups


def param_groups_for(model: nn.Module, name: str, hp: dict[str, Any], *, embedding_lr=None,
                     embedding_weight_decay=None) -> tuple[list[dict], list[dict]]:
    """Dense param groups for optimizer ``name`` and the sparse-embedding groups of ``model``."""
    spec = _spec(name)
    raw = _module_groups(model)
    dense: list[dict] = []

    def mk(kind, items, **extra):
        return {"params": [p for _, p in items], "param_names": [n for n, _ in items], "group": kind, **extra}

    if raw["decay"]:
        dense.append(mk("decay", raw["decay"]))
    if raw["embedding"]:
        extra = {}
        if embedding_lr is not None:
            extra["lr"] = embedding_lr
        if embedding_weight_decay is not None and "weight_decay" in _valid_hp(spec):
            extra["weight_decay"] = embedding_weight_decay
        dense.append(mk("embedding", raw["embedding"], **extra))
    if raw["no_decay"]:
        extra = {k: 0.0 for k in spec.reg_keys if k in _valid_hp(spec)}
        if spec.layer_adaptation:
            extra["layer_adaptation"] = False
        dense.append(mk("no_decay", raw["no_decay"], **extra))
    sparse = []
    if raw["sparse_embedding"]:
        extra = {"lr": embedding_lr} if embedding_lr is not None else {}
        sparse.append(mk("sparse_embedding", raw["sparse_embedding"], **extra))
    return dense, sparse


# how an optimizer runs, not what it computes: not passed from a dense optimizer to its sparse route
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def constructor_args(name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Of ``values`` (an optimizer's defaults, or a param group), the hyperparameters optimizer
    ``name``'s constructor takes, less ``lr`` (per group by design: a group's own, such as
    ``embedding_lr=0``, need not pass the constructor's check) and how it runs
    (:data:`_IMPLEMENTATION_KEYS`). Some constructors use them beyond the group defaults
    (Adagrad fills its state with ``initial_accumulator_value``)."""
    return {k: values[k] for k in _valid_hp(_spec(name))
            if k in values and k not in _IMPLEMENTATION_KEYS and k != "lr"}


def _fusable(groups, devices: tuple) -> bool:
    """Every parameter a dense floating tensor on a device type the fused kernel supports."""
    for g in groups:
        for p in g["params"] if isinstance(g, dict) else [g]:
            if not isinstance(p, torch.Tensor) or not p.is_floating_point() or p.device.type not in devices:
                return False
    return True


def build_optimizer(name: str, params, **hp) -> Optimizer:
    """Build registry optimizer ``name`` for an ``nn.Module`` (grouping rules applied) or for
    parameters / named parameters / param-group dicts (used as given).

    Registry options (see ``REGISTRY_OPTIONS``): ``embedding_lr``, ``embedding_weight_decay``,
    ``sparse_optimizer``, ``sparse_hp``, ``group_rules``. Everything else is a hyperparameter of the
    optimizer; unknown names and invalid values raise ``ValueError`` listing the valid ones.
    """
    spec = _spec(name)
    key = name.strip().lower()
    embedding_lr = hp.pop("embedding_lr", None)
    embedding_wd = hp.pop("embedding_weight_decay", None)
    sparse_name = hp.pop("sparse_optimizer", "sparse_adam")
    sparse_hp = dict(hp.pop("sparse_hp", None) or {})
    group_rules = hp.pop("group_rules", True)
    # per-group values go into the groups as given: torch validates only the constructor's
    # defaults, so a negative embedding_lr trained the embeddings by gradient ascent
    for option, v in (("embedding_lr", embedding_lr), ("embedding_weight_decay", embedding_wd)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise ValueError(f"invalid {option}={v!r}: a finite number >= 0")
    if sparse_name not in _SPARSE_ROUTES:
        raise ValueError(f"invalid sparse_optimizer={sparse_name!r}; valid: {', '.join(_SPARSE_ROUTES)}")

    if isinstance(params, nn.Module):
        if not group_rules or spec.single_group:
            named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
            if spec.single_group and any(getattr(m, "sparse", False) for m in params.modules()
                                         if isinstance(m, _EMB_TYPES)):
                raise ValueError(f"optimizer {name!r} needs a single dense param group; sparse embeddings "
                                 "are not supported")
            groups = [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]
            sparse_groups: list[dict] = []
        else:
            groups, sparse_groups = param_groups_for(params, key, hp, embedding_lr=embedding_lr,
                                                     embedding_weight_decay=embedding_wd)
    else:
        groups = list(params)
        sparse_groups = []
        if embedding_lr is not None or embedding_wd is not None:
            raise ValueError("embedding_lr/embedding_weight_decay need an nn.Module (to find the embeddings)")
    if not groups and not sparse_groups:
        raise ValueError("optimizer got an empty parameter list")

    # weight_decay=0 is accepted by every optimizer (a no-op where the method has no such term), so
    # generic training loops can always pass it; a non-zero value still raises below
    if "weight_decay" in hp and "weight_decay" not in _valid_hp(spec) and not hp["weight_decay"]:
        hp.pop("weight_decay")

    if (spec.fused_devices and groups and "foreach" not in hp and "fused" not in hp
            and _fusable(groups, spec.fused_devices)):
        hp["fused"] = True  # one fused kernel per step: the fastest torch path where torch has one

    if not sparse_groups:
        return _construct(key, groups, **hp)

    # dense + sparse: one CombinedOptimizer; each group names its inner optimizer ('route').
    # The dense optimizer validates hp and fills the group defaults; a model of sparse=True embeddings
    # only has no dense parameters, so it is built on a throwaway tensor and left out (torch refuses
    # an empty parameter list)
    dense_opt = _construct(key, groups or [nn.Parameter(torch.zeros(1))], **hp)
    sparse_spec = _spec(sparse_name)
    lr = hp.get("lr", dense_opt.defaults.get("lr"))
    s_hp = {"lr": lr} if "lr" in _valid_hp(sparse_spec) and lr is not None else {}
    if sparse_name == key:  # the tables follow the same rule: with the same hyperparameters (l1/l2, beta,
        # eps, initial_accumulator_value...), as dense tables in the dense optimizer's `embedding` group have
        # them; until the twenty-fifth session they got the sparse optimizer's defaults (FTRL without L1)
        s_hp.update(constructor_args(sparse_name, dense_opt.defaults))
        if embedding_wd is not None and "weight_decay" in s_hp:
            s_hp["weight_decay"] = embedding_wd
    s_hp.update(sparse_hp)
    if sparse_name == "sgd" and (s_hp.get("momentum") or s_hp.get("nesterov")):
        raise ValueError(
            "sparse_optimizer='sgd' with momentum: exact momentum decays every row of the buffer at every "
            "step, so sparse gradients save nothing, and torch's sparse momentum buffer keeps every batch's "
            "rows (it grows by one batch of rows per step, without bound). Use dense embeddings "
            "(sparse=False) for momentum, or sparse_optimizer 'sgd' without momentum, 'adagrad', 'ftrl' or "
            "'sparse_adam'")
    sparse_opt = _construct(sparse_name, sparse_groups, **s_hp)
    all_groups = []
    for route, opt in ((key, dense_opt), (sparse_name, sparse_opt)):
        if opt is dense_opt and not groups:
            continue
        for g in opt.param_groups:
            g["route"] = route
            all_groups.append(g)
    return CombinedOptimizer(all_groups)
