"""Event generation from trained generator exports.

`uhg.models.generator.Generator` loads an export (safetensors + JSON, no pickle) and generates
events whose randomness depends only on (seed, event index); `uhg.generate.single` writes them
to a store in one process; `distributed` / `overlay` spread the same over Ray actors.
"""
