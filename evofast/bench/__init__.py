"""evofast's benchmarks, runnable as `evofast bench <name>` (see `evofast.cli`).

Each benchmark is one module here exposing `HELP` (one line), `add_arguments(parser)`
and `run(args) -> int`; `_common` holds what they share: the environment record,
the timing loop (median and p20 / p80), the device's peak bandwidth, the table on
stdout and the JSON file.
"""
