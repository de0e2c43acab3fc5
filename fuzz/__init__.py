"""Coverage-guided fuzzing of every parser of kernel output and of input files (atheris).

One harness per parser family; each has `test_one_input(data: bytes)`, which raises only on a
finding, and a `main()` for atheris. `make fuzz` runs them all (fuzz/run.py); tests/test_fuzz.py
runs each for a few hundred inputs without atheris.
"""
