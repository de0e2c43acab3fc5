"""setuptools' one hook beyond pyproject.toml: the source revision written into the package as
it is built, for `--version` and `conntrack_exporter_build_info` (conntrack_exporter/revision.py).

The revision is CONNTRACK_EXPORTER_REVISION if set (the Dockerfile passes its REVISION build
argument, since its build context has no .git), else the checkout's git HEAD; with neither, no
file is written and the exporter says "unknown". An editable install writes nothing: it reads
the checkout's HEAD as it runs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PACKAGE = "conntrack_exporter"


def _revision_module() -> ModuleType:
    # By its path: the package itself is not importable while it is being built.
    spec = importlib.util.spec_from_file_location("_revision", ROOT / PACKAGE / "revision.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithRevision(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        revision = _revision_module()
        given = os.environ.get("CONNTRACK_EXPORTER_REVISION", "").strip()
        if given and not revision.VALID_REVISION.fullmatch(given):
            raise SystemExit(
                f"CONNTRACK_EXPORTER_REVISION={given!r}: expected a commit id, a tag or a "
                "describe string (letters, digits, ._+-, at most 80 characters)"
            )
        found = given or revision.git_revision(ROOT)
        if found:
            target = Path(self.build_lib) / PACKAGE / revision.REVISION_FILE
            target.write_text(f"{found}\n", encoding="ascii")
            self._revision_file = str(target)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        written = getattr(self, "_revision_file", None)
        return [*outputs, written] if written else outputs


setup(cmdclass={"build_py": BuildPyWithRevision})
