"""zoplan's benchmarks: measurements only, each run from the repository root as
`python -m bench.NAME` (its usage in the module's docstring); results in docs/results/.
"""
