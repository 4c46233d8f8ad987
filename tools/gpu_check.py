"""The GPU figures in one run: one JSON line per figure, each guarded, within a time budget.

    python tools/gpu_check.py                                   # on a GPU machine (device cuda)
    python tools/gpu_check.py --train-minutes 3 --out "$OUT"    # also train the full-resolution PXD configs
    python tools/gpu_check.py --device cpu --quick              # the CPU fallback (small configs, tiny sizes)

Each figure runs one of the benchmark tools (tools/bench_generate.py, bench_train.py,
bench_transformer.py, bench_ray_overhead.py) in its own process with a timeout, so a missing
package (ray, deepspeed, zarr, mlflow), an error or a hang ends that figure only: its line then
carries "error" instead of "value". Lines: {"figure", "value", "unit", "target", "ratio_to_target"
(value / target, > 1 is better), "device", "details"}. Nothing is downloaded or installed.

Figures: GAN and transformer full-resolution PXD generation (events/s; on CUDA in bf16, the GAN
eager and torch.compile'd, the better one counts), GAN training step time, transformer training
MFU in bf16 (peak from the device name, or --peak-tflops), the fraction of GAN training step
time spent waiting on data (tools/bench_data_wait.py, loader_workers 0 and 2), calorimeter ds2 ms per shower at
batch 10 000, and the same training loop under Ray with one worker vs torchrun (overhead).
With --train-minutes N the full-resolution PXD configs then train for about N minutes each
(steps from the measured step time, no final evaluation) and their exports are written under --out/exports, each
file at most 16 MiB (weights stored in bf16 when fp32 would exceed it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_EXPORT_BYTES = 16 * 2**20
# Dense bf16 peak TFLOPs (no sparsity) by device name; the first matching key wins.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0)]


class FigureError(RuntimeError):
    pass


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


# --quick: two bootstrap refits of the count law instead of the config's 16. On the 16 events of the
# quick store each refit is a full L-BFGS fit (16 of them were a fifth of the transformer export's
# start-up on 2 CPU cores); two still write and load the band's buffer, which is all the path checks.
QUICK_BOOTSTRAP = "model.count_bootstrap=2"


class Check:
    """Runs the figures one after the other, each bounded by its own timeout and the budget left."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.deadline = time.monotonic() + args.budget_s
        self.cuda = args.device == "cuda"
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
        if not self.cuda:
            self.env.setdefault("DS_ACCELERATOR", "cpu")
        if args.quick:
            self.env.setdefault("OMP_NUM_THREADS", "1")
        self.results: dict[str, dict] = {}

    # -- running one tool
    def run(self, cmd: list[str], timeout_s: float) -> str:
        left = self.deadline - time.monotonic()
        if left < 5:
            raise FigureError(f"time budget of {self.args.budget_s:.0f} s spent before this figure")
        timeout = min(timeout_s, left)
        try:
            done = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=self.env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise FigureError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
            raise FigureError(f"exit {done.returncode}: {' '.join(cmd)}: " + " | ".join(tail))
        return done.stdout

    @staticmethod
    def json_lines(text: str) -> list[dict]:
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def figure(self, name: str, fn: Callable[[], tuple[float, str, float | None, dict]], higher_is_better: bool) -> None:
        t0 = time.monotonic()
        line: dict = {"figure": name, "device": self.device_name()}
        try:
            value, unit, target, details = fn()
            line.update(value=value, unit=unit, target=target)
            if target:
                line["ratio_to_target"] = round(value / target if higher_is_better else target / value, 3) if value else 0.0
            line["details"] = details
            self.results[name] = line
        except Exception as err:  # noqa: BLE001 - each figure reports its own failure and the rest go on
            line["error"] = f"{type(err).__name__}: {err}"[:2000]
        line["wall_s"] = round(time.monotonic() - t0, 1)
        print(json.dumps(line), flush=True)

    def device_name(self) -> str:
        if not hasattr(self, "_device_name"):
            self._device_name = "cpu"
            if self.cuda:
                import torch

                self._device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda (unavailable)"
        return self._device_name

    # -- configs and sizes
    def cfg(self, family: str) -> str:
        names = {"gan": "pxd_gan", "transformer": "pxd_transformer", "calo": "calo_gan"}
        return f"configs/{names[family]}{'_mini' if self.args.quick else ''}.yaml"

    def store_sets(self, config: str, n_events: int) -> list[str]:
        """Overrides that give a config a private, small simulated training store under the work folder."""
        tag = Path(config).stem.split("_")[0] + ("-mini" if self.args.quick else "")
        return [f"data.store={self.work}/{tag}-{n_events}.zarr", f"data.simulate.n_events={n_events}",
                f"data.simulate.part_size={min(n_events, 64)}", f"data.simulate.workers={self.args.sim_workers}"]

    def train_sets(self) -> list[str]:
        sets = [f"train.device={self.args.device}"]
        if self.cuda:
            sets.append("train.precision=bf16")
        return sets

    @staticmethod
    def flags(sets: list[str]) -> list[str]:
        return [item for kv in sets for item in ("--set", kv)]

    # -- the figures
    def gan_generation(self) -> tuple[float, str, float | None, dict]:
        q = self.args.quick
        batch = "2" if q else "64"
        base = ["tools/bench_generate.py", "--config", self.cfg("gan"), "--batch-sizes", batch,
                "--min-events", "2" if q else "256", "--device", self.args.device]
        variants = {"eager": base + (["--precision", "bf16"] if self.cuda else [])}
        if self.cuda:
            variants["compiled"] = variants["eager"] + ["--compile"]
        runs = {}
        for name, cmd in variants.items():
            try:
                runs[name] = self.json_lines(self.run(cmd, 150))[-1]
            except FigureError as err:
                runs[name] = {"error": str(err)}
        best = max((r for r in runs.values() if "events_per_s" in r), key=lambda r: r["events_per_s"], default=None)
        if best is None:
            raise FigureError(json.dumps(runs))
        return best["events_per_s"], "events/s", 200.0, runs

    def transformer_train(self) -> tuple[float, str, float | None, dict]:
        out = self.work / "transformer_train.json"
        cmd = ["tools/bench_transformer.py", "--config", self.cfg("transformer"), "--device", self.args.device,
               "--steps", "1" if self.args.quick else "8", "--gen-events", "--out", str(out)]
        if self.args.quick:
            cmd += ["--batch-size", "2"]
        if self.cuda:
            cmd += ["--precision", "bf16"]
        peak = self.args.peak_tflops or (peak_tflops(self.device_name()) if self.cuda else None)
        if peak:
            cmd += ["--peak-tflops", str(peak)]
        self.run(cmd, 180)
        res = json.loads(out.read_text())
        if "mfu" in res:
            return res["mfu"], "MFU", 0.40, {**res, "peak_tflops": peak}
        return res["achieved_tflops"], "TFLOP/s (no peak known for this device: pass --peak-tflops)", None, res

    def transformer_generation(self) -> tuple[float, str, float | None, dict]:
        out = self.work / "transformer_generate.json"
        n = "1" if self.args.quick else "16"
        cmd = ["tools/bench_transformer.py", "--config", self.cfg("transformer"), "--device", self.args.device,
               "--steps", "1", "--batch-size", "1", "--gen-events", n, "--out", str(out)]
        # An unfitted count model draws an unbounded number of hits per sensor; where the tool can
        # fit the data-driven start first, the figure is taken at the realistic hit count.
        if "--fit-events" in (ROOT / "tools" / "bench_transformer.py").read_text():
            cmd += ["--fit-events", "4" if self.args.quick else "32"]
        if self.args.quick:
            cmd += ["--set", QUICK_BOOTSTRAP]
        if self.cuda:
            cmd += ["--precision", "bf16"]
        self.run(cmd, 150)
        res = json.loads(out.read_text())
        ms = res[f"generate_ms_per_event_batch{n}"]
        return 1000.0 / ms, "events/s", None, {k: v for k, v in res.items() if k.startswith("generate") or k in
                                               ("machine", "config", "parameters", "precision")}

    def gan_train_step(self) -> tuple[float, str, float | None, dict]:
        config = self.cfg("gan")
        sets = self.store_sets(config, 16 if self.args.quick else 64) + self.train_sets()
        if self.args.quick:
            sets.append("train.batch_size=2")
        cmd = ["tools/bench_train.py", "--config", config, *self.flags(sets),
               "--steps", "1" if self.args.quick else "10", "--warmup", "1" if self.args.quick else "3"]
        res = self.json_lines(self.run(cmd, 240))[-1]
        return res["step_s_median"], "s/step", None, res

    def data_wait(self) -> tuple[float, str, float | None, dict]:
        config = self.cfg("gan")
        q = self.args.quick
        sets = self.store_sets(config, 16 if q else 64) + self.train_sets() + ["data.validation_events=4"]
        sets += ["train.batch_size=2"] if q else []
        cmd = ["tools/bench_data_wait.py", "--config", config, "--steps", "4" if q else "20", "--warmup", "1" if q else "5",
               "--workers", "0", "2", *self.flags(sets)]
        runs = self.json_lines(self.run(cmd, 180))
        best = min(runs, key=lambda r: r["data_wait_fraction_median"])
        return best["data_wait_fraction_median"], "fraction of step time waiting on data (median)", None, {"runs": runs}

    def calo_generation(self) -> tuple[float, str, float | None, dict]:
        batch = "100" if self.args.quick else "10000"
        cmd = ["tools/bench_generate.py", "--config", self.cfg("calo"), "--batch-sizes", batch, "--min-events",
               batch, "--device", self.args.device] + (["--precision", "bf16"] if self.cuda else [])
        res = self.json_lines(self.run(cmd, 120))[-1]
        return res["ms_per_event"], "ms/shower", 0.2, res

    def ray_overhead(self) -> tuple[float, str, float | None, dict]:
        import importlib.util

        for package in ("ray", "deepspeed", "mlflow"):
            if importlib.util.find_spec(package) is None:
                raise FigureError(f"package {package} is not installed (carry its wheel: see docs/benchmarks.md)")
        config = self.cfg("gan")
        q = self.args.quick
        sets = self.store_sets(config, 16 if q else 64) + self.train_sets()
        sets += ["train.batch_size=2"] if q else []
        sets += ["distributed.gpus_per_worker=1"] if self.cuda else []
        cmd = ["tools/bench_ray_overhead.py", "--config", config, "--workers", "1", "--steps", "12" if q else "40",
               "--warmup", "4" if q else "10", "--out", str(self.work / "ray"), *self.flags(sets)]
        res = self.json_lines(self.run(cmd, 300))[-1]
        return res["overhead"], "fraction (Ray / torchrun step time - 1)", None, res

    # -- training and exports
    def train(self, family: str, minutes: float) -> tuple[float, str, float | None, dict]:
        config = self.cfg(family)
        key = {"gan": "gan_train_step_s", "transformer": "transformer_train_mfu"}[family]
        known = self.results.get(key, {}).get("details", {})
        step_s = known.get("step_s_median") or known.get("train_step_s_median")
        steps = max(1, int(minutes * 60 / step_s)) if step_s else self.args.fallback_steps
        run_dir = self.work / f"train-{family}"
        sets = self.store_sets(config, 16 if self.args.quick else self.args.train_events) + self.train_sets() + [
            f"train.steps={steps}", f"output_dir={run_dir}", "train.checkpoint_every=0", "train.validate_every=0",
            "distributed.workers=1", f"name={Path(config).stem}",
            # the exports are evaluated afterwards on CPU (docs/benchmarks.md): no device time for it here
            "evaluate.final=false"]
        if self.args.quick:
            sets.append("train.batch_size=2")
            if family == "transformer":
                sets.append(QUICK_BOOTSTRAP)
        cmd = ["-m", "uhg", "train", "--local", "--no-tracking", "--config", config, *self.flags(sets)]
        # the budget covers the figures; a training run gets its own minutes plus start-up and export
        saved, self.deadline = self.deadline, time.monotonic() + minutes * 60 * 1.5 + 300
        try:
            self.run(cmd, minutes * 60 * 1.5 + 300)
        finally:
            self.deadline = saved
        exports = sorted(run_dir.rglob("generator.json"))
        if not exports:
            raise FigureError(f"no export under {run_dir}")
        dest = Path(self.args.out) / "exports" / Path(config).stem
        info = copy_export(exports[-1].parent, dest)
        return float(steps), "steps", None, {**info, "config": config, "step_s_estimate": step_s}


def copy_export(src: Path, dest: Path) -> dict:
    """Copy an export; weights over MAX_EXPORT_BYTES are rewritten in bf16 (Generator.load
    widens them back to the module's fp32 parameters)."""
    import torch
    from safetensors.torch import load_file, save_file

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    weights = dest / "generator.safetensors"
    stored = "fp32"
    if weights.stat().st_size > MAX_EXPORT_BYTES:
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as fh:
            metadata = fh.metadata()
        tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
        save_file(tensors, str(weights), metadata=metadata)
        stored = "bf16"
    sizes = {f.name: f.stat().st_size for f in dest.iterdir() if f.is_file()}
    too_big = {k: v for k, v in sizes.items() if v > MAX_EXPORT_BYTES}
    if too_big:
        raise FigureError(f"export files over 16 MiB even in bf16: {too_big}")
    return {"export": str(dest), "weights": stored, "bytes": sizes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="small configs and sizes (the test-suite path)")
    ap.add_argument("--train-minutes", type=float, default=0.0, help="then train each full-resolution PXD config this long")
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="exports go here (default: $OUT)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the figures")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak for MFU (default: by device name)")
    ap.add_argument("--train-events", type=int, default=256,
                    help="events of the simulated store --train-minutes trains on (the figures use 64)")
    ap.add_argument("--sim-workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    ap.add_argument("--fallback-steps", type=int, default=200, help="training steps when no step time was measured")
    ap.add_argument("--only", default="", help="comma-separated figure names to run (default: all)")
    args = ap.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(json.dumps({"figure": "device", "error": "CUDA is not available; use --device cpu"}), flush=True)
            return 1
    work = Path(tempfile.mkdtemp(prefix="uhg-gpu-check-"))
    check = Check(args, work)
    figures = [("gan_generate_events_per_s", check.gan_generation, True),
               ("transformer_train_mfu", check.transformer_train, True),
               ("transformer_generate_events_per_s", check.transformer_generation, True),
               ("gan_train_step_s", check.gan_train_step, False),
               ("train_data_wait_fraction", check.data_wait, False),
               ("calo_ds2_ms_per_shower", check.calo_generation, False),
               ("ray_overhead", check.ray_overhead, False)]
    only = {x for x in re.split(r"[,\s]+", args.only) if x}
    unknown = only - {name for name, _, _ in figures}
    if unknown:
        raise SystemExit(f"--only: unknown figure(s) {sorted(unknown)}")
    try:
        for name, fn, higher in figures:
            if not only or name in only:
                check.figure(name, fn, higher)
        for family in ("gan", "transformer") if args.train_minutes > 0 else ():
            check.figure(f"train_{family}_export", lambda f=family: check.train(f, args.train_minutes), True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
