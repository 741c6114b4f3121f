"""The public API is one sorted ``__all__`` per package, and it does not drift (AnyIO's idea)."""

import importlib
import inspect

import pytest


@pytest.mark.parametrize("package", ["agent", "hardware"])
def test_all_is_sorted_unique_and_complete(package: str) -> None:
    mod = importlib.import_module(package)
    names = mod.__all__
    assert names == sorted(names), f"{package}.__all__ is not sorted"
    assert len(names) == len(set(names)), f"{package}.__all__ has duplicates"
    for name in names:
        assert hasattr(mod, name), f"{package}.__all__ names {name!r}, which it does not define"
    public = {
        n
        for n, v in vars(mod).items()
        if not n.startswith("_") and not inspect.ismodule(v) and n not in ("annotations",)
    }
    assert public == set(names), (
        f"{package} defines public names missing from __all__: {public - set(names)}"
    )


@pytest.mark.parametrize("package", ["agent", "hardware"])
def test_exported_errors_share_one_root(package: str) -> None:
    mod = importlib.import_module(package)
    root = mod.AgentError if package == "agent" else mod.HardwareError
    errors = [
        getattr(mod, n)
        for n in mod.__all__
        if inspect.isclass(getattr(mod, n)) and issubclass(getattr(mod, n), BaseException)
    ]
    assert errors, "no errors exported"
    for err in errors:
        assert issubclass(err, root), f"{err.__name__} does not derive from {root.__name__}"
        if err is root:
            continue
        doc = (err.__doc__ or "").strip()
        assert doc.startswith("Raised when"), (
            f"{err.__name__} needs a one-line 'Raised when ...' docstring"
        )
