"""What every harness shares: seeds from the captured fixtures, and the atheris entry point."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FunctionType, ModuleType

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
# Corpora, logs and crashing inputs; FUZZ_WORK moves them (the tests put them in a temp dir).
WORK = Path(os.environ.get("FUZZ_WORK", ROOT / "build" / "fuzz"))


def fuzz(
    name: str,
    test_one_input: Callable[[bytes], None],
    seeds: Iterable[bytes],
    covered: tuple[str, ...] = ("conntrack_exporter",),
) -> None:
    """Run libFuzzer on test_one_input; sys.argv carries libFuzzer's flags (-runs=N, ...).

    Coverage guides the fuzzer through the packages named in `covered`. The corpus lives in
    build/fuzz/NAME/corpus (kept between runs, as libFuzzer intends), seeded afresh with the
    fixtures; a crashing input is written to build/fuzz/NAME/.
    """
    import atheris  # `make fuzz` installs it; the harnesses import without it

    corpus = WORK / name / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(seeds):
        (corpus / f"seed-{index:04d}").write_bytes(seed)
    _instrument(atheris, covered)
    flags = [f"-artifact_prefix={WORK / name}/", *sys.argv[1:]]
    atheris.Setup([sys.argv[0], *flags, str(corpus)], test_one_input)
    atheris.Fuzz()


def _instrument(atheris: ModuleType, packages: tuple[str, ...]) -> None:
    """Coverage in every function of the packages, already imported: atheris.instrument_all
    would take ~9 s over the whole standard library for nothing."""
    for module in list(sys.modules.values()):
        if module.__name__.partition(".")[0] not in packages:
            continue
        for value in vars(module).values():
            for function in _functions(value, module.__name__):
                atheris.instrument_func(function)


def _functions(value: object, module: str) -> list[FunctionType]:
    """The functions a module defines: its own, and its classes' methods and properties."""
    if isinstance(value, FunctionType):
        return [value] if value.__module__ == module else []
    if not isinstance(value, type) or value.__module__ != module:
        return []
    found = []
    for member in vars(value).values():
        if isinstance(member, staticmethod | classmethod):
            member = member.__func__
        elif isinstance(member, property):
            member = member.fget
        if isinstance(member, FunctionType):
            found.append(member)
    return found
