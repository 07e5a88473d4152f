"""The old import name. `import harness` still works for one release and warns: use `stance_harness`."""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

warnings.warn("the package `harness` is now `stance_harness`; `harness` will be removed in the next release",
              DeprecationWarning, stacklevel=2)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`harness.X` is `stance_harness.X`: the same module object, so state is never duplicated."""

    def find_spec(self, name, path=None, target=None):
        if name.startswith("harness."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("stance_harness" + spec.name[len("harness"):])

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Alias())
sys.modules[__name__] = importlib.import_module("stance_harness")
