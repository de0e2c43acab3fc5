"""grafana/dashboards/generate.py as a module, for the tests that read the dashboards.

The generator is a script beside the JSON it writes, not part of the package: import it by
path, once.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DASHBOARDS_DIR = Path(__file__).resolve().parent.parent / "grafana" / "dashboards"
MODULE_NAME = "conntrack_exporter_dashboards_generate"


def import_generator() -> ModuleType:
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, DASHBOARDS_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


generate = import_generator()
