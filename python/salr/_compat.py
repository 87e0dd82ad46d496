"""The module paths of salr 0.1 (``salr.convert``, ``salr.salr_linear``, ``salr.training``, ...), kept
importable for one release: each is an alias module built on import from the modules its contents
moved to, and importing it warns DeprecationWarning naming the new home. The alias holds the same
objects (``salr.salr_linear.SALRLinear is salr.methods.salr.layer.SALRLinear``); it is a snapshot,
so patching an attribute of an alias does not reach the code that moved.

Private names that were renamed when they became shared (``_open_run`` -> ``open_run`` ...) are
listed in :data:`RENAMED`. ``salr.losa``, ``salr.ops``, ``salr.cli`` and ``salr.interop.hf`` are
still real modules and need no alias.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

# old module -> the modules its names now live in (first = the main new home, named in the warning).
ALIASES: dict[str, tuple[str, ...]] = {
    "salr._meta": ("salr.ops._meta",),
    "salr.assets": ("salr.cli.assets", "salr.io.files"),
    "salr.batches": ("salr.train.data",),
    "salr.benchmark": ("salr.cli.bench",),
    "salr.calibration": ("salr.prune.calibration",),
    "salr.checkpoint": ("salr.train.checkpoint", "salr.train.state"),
    "salr.convert": ("salr.methods.convert", "salr.methods.salr.model", "salr.io.saved_model"),
    "salr.demo": ("salr.cli.demo",),
    "salr.evaluate": ("salr.eval.perplexity",),
    "salr.format": ("salr.ops.format",),
    "salr.generation": ("salr.eval.generation",),
    "salr.lm_eval_adapter": ("salr.eval.lm_eval",),
    "salr.models": ("salr.nn.models",),
    "salr.pipeline": ("salr.cli.commands", "salr.cli.runs"),
    "salr.pruning": ("salr.prune.criteria", "salr.prune.masks"),
    "salr.reference": ("salr.ops.reference",),
    "salr.runs": ("salr.cli.runs", "salr.io.files"),
    "salr.salor": ("salr.methods.salor.factors", "salr.methods.salor.config"),
    "salr.salor_linear": ("salr.methods.salor.layer", "salr.methods.salor.model", "salr.methods.convert",
                          "salr.io.saved_model"),
    "salr.salr_linear": ("salr.methods.salr.layer", "salr.methods.salr.config"),
    "salr.sparsegpt": ("salr.prune.sparsegpt",),
    "salr.svd_adapter": ("salr.nn.svd",),
    "salr.training": ("salr.train.loop", "salr.train.config", "salr.train.distributed", "salr.train.data"),
    "salr.workflow": ("salr.cli.steps",),
    "salr.interop.files": ("salr.io.files",),
    "salr.losa.masked_lora": ("salr.losa.layer",),
    "salr.losa.pipeline": ("salr.losa.rounds", "salr.losa.config", "salr.losa.model"),
}

# (old module, old name) -> "new.module:new_name" for names that changed.
RENAMED: dict[tuple[str, str], str] = {
    ("salr.pipeline", "_open_run"): "salr.cli.runs:open_run",
    ("salr.pruning", "_prune_smallest"): "salr.prune.masks:prune_smallest",
    ("salr.runs", "_jsonable"): "salr.io.files:jsonable",
    ("salr.training", "_jsonable"): "salr.io.files:jsonable",
    ("salr.training", "_fully_shard"): "salr.train.distributed:_fully_shard_blocks",
    ("salr.training", "_grad_sync"): "salr.train.distributed:_grad_sync",
    ("salr.training", "_TRAJECTORY_FIELDS"): "salr.train.config:TRAJECTORY_FIELDS",
    ("salr.salor_linear", "FACTOR_OPTIONS"): "salr.methods.salor.config:FACTOR_FIELDS",
    ("salr.checkpoint", "_cpu_copy"): "salr.train.state:_cpu_copy",
    ("salr.checkpoint", "_split_optimizer_state"): "salr.train.state:_split_optimizer_state",
    ("salr.checkpoint", "_join_optimizer_state"): "salr.train.state:_join_optimizer_state",
    ("salr.convert", "_make_config"): "salr.methods.salr.model:make_config",
    ("salr.losa.pipeline", "_prune_pass"): "salr.losa.model:prune_pass",
    ("salr.losa.pipeline", "_block_sparsity"): "salr.losa.model:block_sparsity",
}


def _importer_stacklevel() -> int:
    """The stack level of the first frame outside the import machinery and this module, so the
    warning points at the ``import`` line that used the old path."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename == __file__ or "importlib" in frame.f_code.co_filename):
        if "importlib._bootstrap" not in frame.f_code.co_filename:  # warnings skips those frames itself
            level += 1
        frame = frame.f_back
    return level


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, targets: tuple[str, ...]) -> None:
        self.targets = targets

    def create_module(self, spec):  # the default module object
        return None

    def exec_module(self, module: ModuleType) -> None:
        name = module.__name__
        warnings.warn(f"{name} is deprecated and will be removed in the next release; import from "
                      f"{self.targets[0]} (see docs/design.md §3 for where everything moved)",
                      DeprecationWarning, stacklevel=_importer_stacklevel())
        for target in reversed(self.targets):  # the first target wins a name defined twice
            new = importlib.import_module(target)
            module.__dict__.update({k: v for k, v in vars(new).items() if not k.startswith("__")})
        for (old, old_name), where in RENAMED.items():
            if old == name:
                new_module, new_name = where.split(":")
                module.__dict__[old_name] = getattr(importlib.import_module(new_module), new_name)
        module.__doc__ = f"Deprecated alias of {', '.join(self.targets)} (salr 0.1's {name})."


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in ALIASES:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(ALIASES[fullname]))


def install_deprecated_aliases() -> None:
    """Put the alias finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())


def alias_attribute(package: str, name: str) -> ModuleType:
    """``salr.<name>`` for an old module path not imported yet (a package ``__getattr__``)."""
    if f"{package}.{name}" not in ALIASES:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return importlib.import_module(f"{package}.{name}")
