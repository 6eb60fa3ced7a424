"""Built-in codecs, one module each; importing this package registers every module in it
(done lazily by `kvpack.get_codec` / `kvpack.list_codecs`)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
