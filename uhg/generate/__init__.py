"""Event generation from trained generator exports into stores.

`uhg.models.generator.Generator` loads an export (safetensors + JSON, no pickle) and generates
events whose randomness depends only on (seed, event index); `distributed.run_generate` and
`overlay.run_overlay` write them to a store part by part through `ray_pool.run_parts`, in this
process or on Ray actors; `conditions` turns command-line options and files into per-event
conditions.
"""
