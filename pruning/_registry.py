"""The one extension mechanism: registries in the style of timm's ``register_model`` / ``create_model``.

Everything a user may add is registered under a name (criteria, solvers, costs, distillation losses, loggers)
or under the module types it applies to (layer rules, block rules, protected layers), and configs select by
that name (``importance.name: l1``, ``solver.name: exact``, ``distill.name: inner``). Every other key of a
config group's YAML is an argument of what it selects, checked against its signature before it is called.

Built-ins are registered by the modules that define them. A registry whose built-ins live in other modules
(solvers, losses) imports those on its first lookup, so no module is imported for its side effects and the
order of imports never decides what is known; a type registry's built-ins are in its own module.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pkgutil
import sys
from typing import Any, Callable, Generic, Iterator, Mapping, Sequence, TypeVar

from .errors import UserInputError

T = TypeVar("T")
class Registry(Generic[T]):
    """Things of one kind by name: ``@registry.register(name)``, ``registry.create(name, **kwargs)``.

    Args:
        kind: what is registered, for messages (``solver``, ``importance criterion``).
        how: how a user picks one and adds one, for the unknown-name message.
        builtins: modules that register the built-ins, imported on the first lookup; a package is imported with
            every module in it, so a new solver or loss is one more file in ``pruning/solvers/`` or
            ``distill/losses/``.
    """

    def __init__(self, kind: str, how: str = "", builtins: Sequence[str] = ()) -> None:
        self.kind, self.how = kind, how
        self._items: dict[str, T] = {}
        self._builtins, self._loaded = tuple(builtins), not builtins

    def _load(self) -> None:
        """Import the built-ins' modules once, on the first lookup."""
        if self._loaded:
            return
        self._loaded = True  # first: the built-ins' own registrations look things up too
        for module in self._builtins:
            _import_all(module)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering a class or function as ``name``; a class also gets ``name`` as its ``name``.

        Raises:
            ValueError: ``name`` is taken (unregister the old one first).
        """

        def add(obj: T) -> T:
            self._load()
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered ({_qualname(self._items[name])}); "
                                 "choose another name, or unregister the old one first")
            if isinstance(obj, type):
                obj.name = name
            self._items[name] = obj
            return obj

        return add

    def unregister(self, name: str) -> T:
        """Remove ``name`` (tests, or replacing a built-in); returns what was registered."""
        self._load()
        return self._items.pop(name)

    def get(self, name: str) -> T:
        """What is registered as ``name``.

        Raises:
            UserInputError: an unknown name; the message lists the known ones and how to add one.
        """
        self._load()
        if name not in self._items:
            how = f" ({self.how})" if self.how else ""
            raise UserInputError(f"unknown {self.kind} {name!r}; choose one of {self.names()}{how}")
        return self._items[name]

    __getitem__ = get

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call (instantiate) what is registered as ``name`` with these arguments, checked first.

        Raises:
            UserInputError: an unknown name, or an argument it does not take (a misspelt config key).
        """
        obj = self.get(name)
        check_arguments(obj, f"{self.kind} {name!r}", *args, **kwargs)
        return obj(*args, **kwargs)

    def from_config(self, cfg: Mapping[str, Any], *args: Any, exclude: Sequence[str] = ()) -> Any:
        """``create(cfg["name"], *args, **rest)``: every key of a config group's YAML but ``name`` (and the
        ``exclude`` keys, read by the caller) is an argument of what ``name`` selects."""
        cfg = _plain(cfg)
        kwargs = {k: v for k, v in cfg.items() if k != "name" and k not in exclude}
        return self.create(cfg["name"], *args, **kwargs)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


class TypeRegistry(Generic[T]):
    """Values keyed by module (or model) type; lookup walks the type's MRO, so subclasses inherit their base's.

    The built-ins are registered by the module that defines the registry, so it is complete once imported.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._values: dict[type, T] = {}

    def add(self, module_types: Sequence[type], value: T) -> None:
        """Register ``value`` for ``module_types`` and their subclasses (replacing what a type had)."""
        for t in module_types:
            if not isinstance(t, type):
                raise TypeError(f"a {self.kind} is registered for types, got {t!r}")
            self._values[t] = value

    def register(self, *module_types: type) -> Callable[[type], type]:
        """Class decorator registering an instance of the class (made once) for ``module_types``."""

        def wrap(cls: type) -> type:
            self.add(module_types, cls())
            return cls

        return wrap

    def unregister(self, *module_types: type) -> None:
        """Remove what ``module_types`` were registered with (tests, or replacing a built-in)."""
        for t in module_types:
            self._values.pop(t, None)

    def find(self, obj: object) -> T | None:
        """The value registered for ``obj``'s type or its nearest registered base class, else None."""
        for cls in type(obj).__mro__:
            if cls in self._values:
                return self._values[cls]
        return None


def _import_all(name: str) -> None:
    """Import module ``name``, and when it is a package, every module in it."""
    module = importlib.import_module(name)
    for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
        importlib.import_module(f"{name}.{info.name}")


def import_plugins(plugins: Sequence[str] | None) -> None:
    """Import the modules that register a run's own extensions (the config key ``plugins``), once each.

    Args:
        plugins: dotted module names (``mypkg.criteria``, importable from the working directory or the
            environment) or paths of ``.py`` files.

    Raises:
        UserInputError: a plugin that cannot be found or fails to import, naming it and the error.
    """
    for plugin in plugins or ():
        try:
            if str(plugin).endswith(".py"):
                _import_file(str(plugin))
            else:
                importlib.import_module(str(plugin))
        except Exception as e:
            if isinstance(e, UserInputError):
                raise
            raise UserInputError(f"plugins: cannot import {plugin!r} ({type(e).__name__}: {e}); give a module name "
                                 "importable from here or the path of a .py file") from e


def _import_file(path: str) -> None:
    name = "kp_plugin_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(path))
    if name in sys.modules:
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path!r}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def check_arguments(fn: Callable, what: str, *args: Any, **kwargs: Any) -> None:
    """Raise a :class:`UserInputError` when ``fn`` cannot be called with these arguments, naming the ones it takes.

    A config key that the selected class or function does not read is a typo or belongs to another option.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        params = signature.parameters
        takes = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        unknown = sorted(set(kwargs) - set(takes))
        problem = f"cannot take {unknown}" if unknown else f"cannot be called so ({e})"
        raise UserInputError(f"{what} {problem}; its arguments are {takes}") from None


def _plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A config node (resolved) or a mapping as a plain dict."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
