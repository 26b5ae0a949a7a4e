"""Recording the launches of the kernel modules' ``aot_scenarios()``: ``JITFunction.run`` and ``Autotuner.run``
patched to store the kernel, its mocked arguments (dtype, shape, 16-byte alignment) and options instead of launching;
identical specialisations are kept once; every ``*_kernel`` must be launched by some scenario."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import traceback
from dataclasses import dataclass, field

LOW_PRECISION = ("bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
_SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int64": "i64",
                "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}



@dataclass
class Launch:
    """One recorded launch: the kernel, mocked arguments and the features that tell its variant apart."""

    module: str
    kernel: str
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    key: tuple  # identical keys compile to the same binary
    features: dict  # name -> short value (constexprs, options, int specialisation, dtypes)
    low_precision: bool
    count: int = 1  # how many recorded launches share this key
    variant: str = ""


@dataclass
class Recording:
    launches: list = field(default_factory=list)
    kernels: dict = field(default_factory=dict)  # module -> [kernel names defined there ending in _kernel]
    errors: list = field(default_factory=list)  # problems that fail the check before any compile


def _mock_class():
    from triton.runtime.jit import MockTensor

    class AotTensor(MockTensor):
        """MockTensor with the real tensor's byte offset, so pointer alignment specialises as on the GPU (a fresh
        allocation is 256-byte aligned there; a view may not be)."""

        def __init__(self, dtype, shape, offset_bytes):
            super().__init__(dtype, list(shape) or [1])
            self.offset_bytes = offset_bytes

        def data_ptr(self):  # noqa: D102 - overrides MockTensor's staticmethod
            return self.offset_bytes

        def __repr__(self):
            return f"AotTensor({self.dtype}, {self.shape}, +{self.offset_bytes})"

    return AotTensor


def _mock(value, mock_cls):
    import torch

    if isinstance(value, torch.Tensor):
        return mock_cls(value.dtype, tuple(value.shape), value.storage_offset() * value.element_size())
    if isinstance(value, tuple):
        return tuple(_mock(v, mock_cls) for v in value)
    return value


def _short(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if value is None:
        return "None"
    name = getattr(value, "__name__", None)
    if callable(value) and name:
        return name
    text = str(value)
    if text.startswith("torch."):
        text = _SHORT_DTYPE.get(text[6:], text[6:])
    return text


def _int_spec(value: int, specialize: bool) -> str:
    # what Triton specialises a non-constexpr int on: its width, == 1, divisibility by 16
    width = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
    if not specialize:
        return width
    if value == 1:
        return "1"
    return width + ("%16" if value % 16 == 0 else "")


def _describe(fn, args: tuple, kwargs: dict, mock_cls):
    """(dedupe key, features, low_precision) of one launch."""
    params = list(fn.params)
    names = [p.name for p in params]
    bound = dict(zip(names, args))
    options = {}
    for k, v in kwargs.items():
        (bound if k in names else options)[k] = v
    defaults = {p.name: p.default for p in params}
    key, features, floats, ints = [], {}, set(), set()
    for p in params:
        if p.name not in bound:
            if defaults[p.name] is inspect.Parameter.empty:
                raise TypeError(f"{fn.__name__}: launch without argument {p.name!r}")
            bound[p.name] = defaults[p.name]
        v = bound[p.name]
        if p.is_constexpr:
            key.append((p.name, "c", repr(v)))
            features[p.name] = _short(v)
        elif isinstance(v, mock_cls):
            dt = str(v.dtype).removeprefix("torch.")
            aligned = v.offset_bytes % 16 == 0
            key.append((p.name, "t", dt, aligned))
            (floats if v.dtype.is_floating_point else ints).add(dt)
            if not aligned:
                features[p.name] = "unaligned"
        elif isinstance(v, bool) or v is None or isinstance(v, float):
            key.append((p.name, type(v).__name__))
        elif isinstance(v, int):
            spec = _int_spec(v, not getattr(p, "do_not_specialize", False))
            key.append((p.name, "i", spec))
            features[p.name] = spec
        else:
            key.append((p.name, "o", repr(v)))
    for k in sorted(options):
        key.append((k, "opt", repr(options[k])))
        features[k] = _short(options[k])
    # the floating dtypes tell a variant apart; kernels without any (copies in integer units): the integer ones
    features["dtypes"] = "+".join(sorted(_SHORT_DTYPE.get(d, d) for d in (floats or ints)) or ["-"])
    low = any(d in LOW_PRECISION for d in floats)
    return (fn.module, fn.__name__, tuple(key)), features, low


def _unwrap(obj):
    """The JITFunction behind an Autotuner / Heuristics wrapper, or None."""
    from triton.runtime.jit import JITFunction, KernelInterface

    seen = 0
    while isinstance(obj, KernelInterface) and not isinstance(obj, JITFunction) and seen < 8:
        obj = getattr(obj, "fn", None)
        seen += 1
    return obj if isinstance(obj, JITFunction) else None


def _interpreted(obj) -> bool:
    return type(obj).__name__ == "InterpretedFunction"


def record(package: str = "r4b_fast.kernels") -> Recording:
    """Import every module of ``package``, run its ``aot_scenarios()`` with launches recorded, check coverage.

    Returns a :class:`Recording` with the unique launches (``count`` = recorded launches with that key) and the
    errors found (missing ``aot_scenarios``, a scenario that raised, a ``*_kernel`` no scenario launched).
    """
    import triton.runtime.autotuner as autotuner
    from triton.runtime.jit import JITFunction

    rec = Recording()
    pkg = importlib.import_module(package)
    mod_names = sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".") if not m.ispkg)
    current: list = []
    recording_run, recording_autotune = _recording_hooks(rec, current, _mock_class())
    saved = (JITFunction.run, autotuner.Autotuner.run)
    JITFunction.run, autotuner.Autotuner.run = recording_run, recording_autotune
    try:
        for name in mod_names:
            _record_module(name, package, rec, current)
    finally:
        JITFunction.run, autotuner.Autotuner.run = saved
    _check_coverage(rec, package)
    _label(rec.launches)
    return rec


def _recording_hooks(rec: Recording, current: list, mock_cls):
    """``(JITFunction.run, Autotuner.run)`` replacements that record each launch into ``rec`` (one Launch per
    distinct key, counting repeats) and append its key to ``current``, instead of launching."""
    by_key: dict = {}

    def recording_run(self, *args, grid, warmup, **kwargs):
        margs = tuple(_mock(a, mock_cls) for a in args)
        mkw = {k: _mock(v, mock_cls) for k, v in kwargs.items()}
        key, features, low = _describe(self, margs, mkw, mock_cls)
        if key in by_key:
            by_key[key].count += 1
        else:
            launch = Launch(self.module, self.__name__, self, margs, mkw, key, features, low)
            by_key[key] = launch
            rec.launches.append(launch)
        current.append(key)
        return None

    def recording_autotune(self, *args, **kwargs):
        # compile every config the autotuner could pick, not only the one a benchmark would
        for config in self.configs:
            cfg = dict(config.all_kwargs())
            self.fn.run(*args, **{**kwargs, **cfg})
        return None

    return recording_run, recording_autotune


def _rel(name: str, package: str) -> str:
    return name[len(package) + 1 :].replace(".", "/") + ".py"


def _record_module(name: str, package: str, rec: Recording, current: list) -> None:
    """Import one kernel module, list the ``*_kernel`` functions it defines and run its ``aot_scenarios()`` (with the
    recording hooks in place); problems go to ``rec.errors``."""
    rel = _rel(name, package)
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - report, keep checking the others
        rec.errors.append(f"{rel}: import failed: {type(exc).__name__}: {exc}")
        return
    defined = []
    for obj in vars(mod).values():
        if _interpreted(obj):
            rec.errors.append(f"{rel}: kernels were defined under TRITON_INTERPRET; unset it")
            break
        jf = _unwrap(obj)
        if jf is not None and jf.module == name and jf.__name__.endswith("_kernel"):
            defined.append(jf.__name__)
    rec.kernels[name] = sorted(set(defined))
    scenarios = getattr(mod, "aot_scenarios", None)
    if scenarios is None:
        rec.errors.append(f"{rel} defines no aot_scenarios()")
        return
    current.clear()
    try:
        scenarios()
    except Exception as exc:  # noqa: BLE001
        tb = traceback.format_exc(limit=-3)
        rec.errors.append(f"{rel}: aot_scenarios() raised {type(exc).__name__}: {exc}\n{tb}")
    if not current and defined:
        rec.errors.append(f"{rel}: aot_scenarios() launched no kernel")


def _check_coverage(rec: Recording, package: str) -> None:
    """An error for every ``*_kernel`` that no scenario launched."""
    launched = {(launch.module, launch.kernel) for launch in rec.launches}
    for name, kernels in rec.kernels.items():
        for k in kernels:
            if (name, k) not in launched:
                rec.errors.append(f"{_rel(name, package)}: {k} is launched by no aot_scenarios() case (add it to the "
                                  "scenarios)")  # fmt: skip


def _label(launches: list) -> None:
    """Variant label: the dtypes plus every feature whose value differs between launches of the same kernel."""
    groups: dict = {}
    for launch in launches:
        groups.setdefault((launch.module, launch.kernel), []).append(launch)
    for group in groups.values():
        names = list(dict.fromkeys(k for g in group for k in g.features if k != "dtypes"))
        varying = [k for k in names if len({g.features.get(k) for g in group}) > 1]
        for g in group:
            parts = [g.features["dtypes"]] + [f"{k}={g.features[k]}" for k in varying if k in g.features]
            g.variant = " ".join(parts)
