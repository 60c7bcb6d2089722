"""GPU check: a few optimizer steps of each ImageNet recipe on a CUDA device, and whether they are sound.

Runs SimCLR (ResNet-50), SwAV multi-crop (ResNet-50, 2x224 + 6x96), MAE and SimMIM (ViT-B/16, 224 px), built from
``recipes/imagenet/<method>.yaml``, at ``bf16-mixed`` and ``16-mixed``, with the methods' ``compile`` off and on,
on synthetic uint8 batches in the loader's ``Batch`` format (so ``prepare_batch`` augments them on the device)
and once each through the real loader (``SSLDataModule(dataset="folder")`` on generated JPEGs, pinned memory on);
then one MAE run under the FSDP strategy of ``recipes/slurm/fsdp.yaml`` with ``ReconstructionImages`` and
``KNNMonitor``. Every run is a ``lightning.Trainer`` fit with the callbacks and plugins ``selfsup fit`` installs.

It asserts finite losses, equal checkpoint state-dict keys with and without compile, page-locked loader batches,
and that the FSDP run's callbacks produced a kNN score and a reconstruction grid; then prints a markdown table
(images/s per GPU in the steady state, MFU, peak memory, data-wait fraction), appends each row to
``benchmarks/results.jsonl`` and, when ``$OUT`` is set, writes the table, a JSON of the rows and the grid there.

    python benchmarks/gpu_check.py               # on a GPU node (rows past --budget-s are skipped and say so)
    python benchmarks/gpu_check.py --quick       # bf16-mixed only, 10 steps per run
    python benchmarks/gpu_check.py --cpu-smoke   # the same code paths on the CPU with tiny models (the tests)

Without a CUDA device (and without --cpu-smoke) it prints one line and exits 0. The smoke traces ``compile`` with
dynamo's eager backend (inductor would build C++ for minutes on a small CPU) and runs the FSDP row's callbacks under
the default strategy. The data, the timer and the recipes as objects live in ``gpu_check_parts.py``.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the time budget counts the imports and the device's start-up too

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 20; --quick 10; --cpu-smoke 2)")
    parser.add_argument("--quick", action="store_true", help="bf16-mixed only, 10 steps per run")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU, fp32 and bf16, FSDP skipped")
    parser.add_argument("--methods", default="simclr,swav,mae,simmim")
    parser.add_argument("--precisions", help="default bf16-mixed,16-mixed (--cpu-smoke: 32-true,bf16-mixed)")
    parser.add_argument("--batch-sizes", default="", help="per GPU, e.g. simclr=128,swav=64 (defaults in BATCH_SIZES)")
    parser.add_argument("--workers", type=int, help="loader workers (default min(10, cores - 2))")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="skip the rows that would start past this many seconds (0: no limit); FSDP keeps a reserve")
    parser.add_argument("--no-fsdp", action="store_true")
    parser.add_argument("--no-record", action="store_true", help="do not append rows to benchmarks/results.jsonl")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for the table and rows (default $OUT)")
    parser.add_argument("--fsdp-only", action="store_true", help=argparse.SUPPRESS)  # the multi-GPU FSDP child
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        parser.error(f"--steps {args.steps}: at least 2 (a warm-up step, then a timed one)")
    return args


if __name__ == "__main__" and not parse_args(sys.argv[1:]).cpu_smoke and not torch.cuda.is_available():
    print(f"gpu_check: skipped: no CUDA device visible to torch {torch.__version__} "
          "(--cpu-smoke runs the same code paths on the CPU)")
    sys.exit(0)

import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import lightning as L  # noqa: E402
import timm  # noqa: E402
import torch._dynamo  # noqa: E402
import yaml  # noqa: E402
from lightning.fabric.utilities.apply_func import move_data_to_device  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops, matmul_peak_gflops, peak_memory_mb, record  # noqa: E402
from gpu_check_parts import (IMAGE_SIDE, ROOT, SMOKE_SIDE, CheckedData, StepTimer, instantiate,  # noqa: E402
                             instantiate_class, make_images, recipe, require, run_callbacks, synced_time)

import selfsup.run  # noqa: E402
from selfsup.checkpoint import load_checkpoint  # noqa: E402
from selfsup.eval.callbacks import KNNMonitor  # noqa: E402
from selfsup.eval.reconstruction import ReconstructionImages  # noqa: E402

BATCH_SIZES = {"simclr": 128, "swav": 64, "mae": 128, "simmim": 128}  # per GPU (the smoke: 8)
SMOKE_BATCH = 8
EVAL_IMAGES = {"probe": 512, "test": 256}  # the FSDP run's kNN splits (the smoke: 40 / 20)
# Dense bf16 tensor-core peaks from the datasheets (TFLOP/s), by a substring of the device name, first match wins.
DENSE_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.4), ("H100", 989.4), ("A100", 312.0),
                     ("L40S", 362.0))


@dataclass
class Check:
    """What every row shares: the machine, the settings, and what earlier rows found."""

    args: argparse.Namespace
    smoke: bool
    steps: int
    precisions: list[str]
    methods: list[str]
    batch_sizes: dict[str, int]
    workers: int
    data_dir: Path
    tmp: Path
    peak_tflops: float = 0.0
    peak_source: str = ""
    matmul_tflops: float | None = None
    started: float = STARTED
    flops: dict[str, int] = field(default_factory=dict)
    keys: dict[tuple[str, str, bool], list[str]] = field(default_factory=dict)
    durations: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})
    artifacts: list[Path] = field(default_factory=list)

    @property
    def accelerator(self) -> str:
        return "cpu" if self.smoke else "gpu"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.smoke else torch.device("cuda", torch.cuda.current_device())

    def warmup(self, compiled: bool) -> int:
        return max(1, min(5 if compiled else 3, self.steps // 2))


def datamodule(check: Check, spec: dict[str, Any], method: str, synthetic: bool, **extra: Any) -> CheckedData:
    keep = ("image_size", "crop_pct", "interpolation", "mean", "std")
    data = CheckedData(dataset="folder", root=str(check.data_dir / "train"), views=instantiate(spec["data"]["views"]),
                       batch_size=check.batch_sizes[method], num_workers=check.workers, seed=0,
                       synthetic_steps=check.steps if synthetic else None,
                       **{key: spec["data"][key] for key in keep if key in spec["data"]}, **extra)
    data.setup("fit")
    return data


def step_flops(check: Check, method: str, model: L.LightningModule, data: CheckedData) -> int:
    """Model FLOPs of one training step (forward and backward) on the eager model, counted once per method."""
    if method not in check.flops:
        model.to(check.device).train()
        batch = data.prepare_batch(move_data_to_device(data.synthetic_batch(), check.device))

        def step() -> None:
            with torch.autocast(check.device.type, dtype=torch.bfloat16):
                loss = model.training_loss(batch)["loss"]
            loss.backward()

        check.flops[method] = count_flops(step)
        model.zero_grad(set_to_none=True)
    return check.flops[method]


def fit(check: Check, row: dict[str, Any], spec: dict[str, Any], data: CheckedData, strategy: Any = "auto",
        devices: int = 1, callbacks: tuple[L.Callback, ...] = ()) -> tuple[L.Trainer, L.LightningModule, dict]:
    """Build the row's method from its recipe, fit it for ``check.steps`` steps, and measure the steady state."""
    model = instantiate({**spec["model"], "init_args": {**spec["model"]["init_args"], "compile": row["compile"]}})
    flops = step_flops(check, row["method"], model, data)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(check.warmup(row["compile"]), check.steps)
    trainer = L.Trainer(accelerator=check.accelerator, devices=devices, strategy=strategy, precision=row["precision"],
                        max_steps=check.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        gradient_clip_val=spec["trainer"].get("gradient_clip_val"),
                        default_root_dir=str(check.tmp / "runs"), callbacks=[*run_callbacks(), *callbacks, timer],
                        plugins=selfsup.run.default_plugins(None, False))
    trainer.fit(model, datamodule=data)
    timed = timer.results()
    batch, steps = check.batch_sizes[row["method"]], check.steps - timer.warmup
    step_s = timed.pop("window_s") / steps
    measured_wait = timed.pop("wait_s") / (step_s * steps)
    logged_wait = trainer.callback_metrics.get("data/wait_fraction")
    require(len(data.pinned) >= check.steps, f"on_before_batch_transfer saw {len(data.pinned)} batches")
    require(all(data.pinned) or not torch.cuda.is_available(),
            f"{data.pinned.count(False)} of {len(data.pinned)} batches reached the transfer without pinned memory")
    return trainer, model, {
        **timed, "batch_size": batch, "devices": devices, "images_per_s_per_gpu": batch / step_s,
        "mfu": flops / step_s / (check.peak_tflops * 1e12), "peak_memory_gib": peak_memory_mb() / 1024,
        "data_wait": float(logged_wait) if logged_wait is not None else measured_wait,
        "data_wait_source": "data/wait_fraction" if logged_wait is not None else "next(loader)",
        "data_wait_measured": measured_wait, "pinned": bool(data.pinned) and all(data.pinned),
        "flops_per_step": flops, "timed_steps": steps}


def state_keys(check: Check, trainer: L.Trainer, name: str) -> list[str]:
    """The state-dict keys of a checkpoint the trainer saves (weights only), read back from the file."""
    path = check.tmp / f"{name}.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    try:
        return sorted(load_checkpoint(path)["state_dict"])
    finally:
        path.unlink(missing_ok=True)


def single_row(check: Check, row: dict[str, Any]) -> dict[str, Any]:
    method, precision = row["method"], row["precision"]
    spec = recipe(method, check.smoke)
    data = datamodule(check, spec, method, synthetic=row["input"] == "synthetic")
    counters = torch._dynamo.utils.counters
    counters.clear()
    trainer, model, result = fit(check, row, spec, data)
    if row["compile"]:
        result["graphs"] = counters["stats"]["unique_graphs"]  # dynamo's compiled graphs, recompiles included
        require(result["graphs"] > 0, "compile: true compiled no graph")
    if row["input"] == "synthetic":
        keys = check.keys[(method, precision, row["compile"])] = state_keys(check, trainer, f"{method}-{precision}")
        require(not any("_orig_mod" in key for key in keys), "compiled modules' keys carry _orig_mod.")
        eager = check.keys.get((method, precision, False))
        if row["compile"] and eager is not None:
            differ = sorted(set(keys) ^ set(eager))
            require(not differ, f"checkpoint keys differ with compile: {differ[:5]} ({len(differ)} in all)")
            result["keys_equal"] = True
    notes = [f"{result['graphs']} graph(s)" if row["compile"] else "", "keys = eager" if "keys_equal" in result else "",
             "pinned" if result["pinned"] else ""]
    return {**result, "notes": ", ".join(n for n in notes if n)}


def fsdp_strategy(check: Check, build: bool = True) -> tuple[Any, str]:
    """The strategy and precision of ``recipes/slurm/fsdp.yaml`` (the default strategy for the CPU smoke)."""
    spec = yaml.safe_load((ROOT / "recipes" / "slurm" / "fsdp.yaml").read_text())["trainer"]
    if check.smoke or not build:
        return "auto", check.precisions[-1] if check.smoke else spec["precision"]
    init = dict(spec["strategy"]["init_args"])
    for key in ("auto_wrap_policy", "activation_checkpointing_policy"):
        if key in init:
            init[key] = {instantiate_class(path) for path in init[key]}
    return instantiate_class(spec["strategy"]["class_path"])(**init), spec["precision"]


def fsdp_row(check: Check, row: dict[str, Any]) -> dict[str, Any]:
    """MAE under FSDP on every visible GPU, with ReconstructionImages and KNNMonitor on small eval splits."""
    devices = torch.cuda.device_count() if not check.smoke else 1
    if devices > 1 and not check.args.fsdp_only:
        return fsdp_in_subprocess(check, devices)
    strategy, _ = fsdp_strategy(check)
    spec = recipe("mae", check.smoke)
    eval_batch = 16 if check.smoke else 256
    data = datamodule(check, spec, "mae", synthetic=False, probe_train_root=str(check.data_dir / "probe"),
                      test_root=str(check.data_dir / "test"), eval_batch_size=eval_batch)
    grids = ReconstructionImages(num_images=8)
    trainer, model, result = fit(check, row, spec, data, strategy, devices, (grids, KNNMonitor(k=20)))
    knn = trainer.callback_metrics.get("knn/top1")
    require(knn is not None and math.isfinite(float(knn)), f"KNNMonitor logged no kNN score: {knn}")
    if trainer.is_global_zero:
        require(bool(grids.paths) and grids.paths[-1].is_file(), "ReconstructionImages wrote no grid")
        check.artifacts.append(grids.paths[-1])
    result.update(knn_top1=float(knn), strategy_class=type(trainer.strategy).__name__,
                  notes=f"kNN top-1 {float(knn):.3f}, grid" + (", pinned" if result["pinned"] else ""))
    if check.args.result and trainer.is_global_zero:
        shutil.copy(grids.paths[-1], Path(check.args.result).with_suffix(".png"))
        Path(check.args.result).write_text(json.dumps({**row, **result}))
    return result


def fsdp_in_subprocess(check: Check, devices: int) -> dict[str, Any]:
    """Several GPUs: Lightning launches one process per GPU by running the command again, so the FSDP run gets
    a command of its own (this script with --fsdp-only), whose rank 0 writes the row to a file."""
    result = check.tmp / "fsdp.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--fsdp-only", "--data-dir", str(check.data_dir),
               "--result", str(result), "--steps", str(check.steps), "--no-record",
               "--batch-sizes", f"mae={check.batch_sizes['mae']}", "--workers", str(check.workers)]
    subprocess.run(command, check=True, timeout=600)
    check.artifacts.append(result.with_suffix(".png"))
    return {k: v for k, v in json.loads(result.read_text()).items() if k not in ("method", "input", "strategy")}


# -- the check --------------------------------------------------------------------------------------------
def plan(check: Check) -> list[dict[str, Any]]:
    """The rows, cheapest and most telling first, so a time budget cuts the least: every precision eager on
    synthetic batches, the loader rows, then the compiled rows (per-block ViT compiles first); FSDP last."""
    def rows(precision: str, compiled: bool, source: str, methods: list[str]) -> list[dict[str, Any]]:
        return [{"method": m, "precision": precision, "compile": compiled, "input": source, "strategy": "single"}
                for m in methods]

    compiled = sorted(check.methods, key=["mae", "simmim", "simclr", "swav"].index)
    out = [row for precision in check.precisions for row in rows(precision, False, "synthetic", check.methods)]
    out += rows(check.precisions[0], False, "loader", check.methods)
    for precision in check.precisions[:1] if check.smoke else check.precisions:  # the smoke compiles once
        out += rows(precision, True, "synthetic", compiled)
    if not check.args.no_fsdp and "mae" in check.methods:
        out += rows(fsdp_strategy(check, build=False)[1], False, "loader", ["mae"])
        out[-1]["strategy"] = "fsdp"
    return out


def over_budget(check: Check, row: dict[str, Any], reserve: float) -> bool:
    if check.args.budget_s <= 0 or row["strategy"] == "fsdp":
        return False
    expected = max(check.durations[row["compile"]], default=60.0 if row["compile"] else 15.0)
    return time.perf_counter() - check.started + expected > check.args.budget_s - reserve


def run_row(check: Check, row: dict[str, Any]) -> None:
    start = time.perf_counter()
    print(f"[gpu_check] {row['method']} {row['precision']} compile={row['compile']} {row['input']} "
          f"{row['strategy']}", flush=True)
    try:
        row.update(fsdp_row(check, row) if row["strategy"] == "fsdp" else single_row(check, row))
        row["status"] = "ok" + (f" ({row['notes']})" if row.get("notes") else "")
    except Exception as err:  # noqa: BLE001 - a failed row is reported and the other rows still run
        traceback.print_exc()
        row["status"] = f"FAIL: {type(err).__name__}: {err}"[:400]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if row["compile"]:
        torch._dynamo.reset()
    row["wall_s"] = time.perf_counter() - start
    check.durations[row["compile"]].append(row["wall_s"])


def device_peak(check: Check) -> None:
    """MFU's denominator: the datasheet's dense bf16 peak by device name, else a measured bf16 matmul."""
    if check.smoke:
        check.peak_tflops = matmul_peak_gflops(torch.float32, size=1024, repeats=4) / 1e3
        check.peak_source = "fp32 1024x1024 matmul measured on this CPU"
        return
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start = synced_time()
    for _ in range(10):
        a @ b
    check.matmul_tflops = 2 * 8192**3 * 10 / (synced_time() - start) / 1e12
    name = torch.cuda.get_device_name()
    listed = next((peak for key, peak in DENSE_BF16_TFLOPS if key in name), None)
    check.peak_tflops = listed or check.matmul_tflops
    check.peak_source = (f"{name} datasheet dense bf16, {listed:.0f} TFLOP/s" if listed else
                         f"{name}: bf16 8192 matmul measured, {check.matmul_tflops:.0f} TFLOP/s")


def table(check: Check, rows: list[dict[str, Any]]) -> str:
    name = "CPU (smoke)" if check.smoke else torch.cuda.get_device_name()
    lines = [f"GPU check on {name}: torch {torch.__version__}, lightning {L.__version__}, timm {timm.__version__}; "
             f"{check.steps} steps per run, the first {check.warmup(False)} (eager) / {check.warmup(True)} (compiled) "
             f"untimed; MFU against the {check.peak_source}"
             + (f" (a bf16 8192 matmul measured {check.matmul_tflops:.0f})" if check.matmul_tflops else "") + ".", "",
             "| method | precision | compile | input | strategy | batch/GPU | images/s/GPU | MFU | peak mem (GiB) "
             "| data wait | warm-up (s) | status |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ok = r.get("status", "").startswith("ok")
        cells = [f"{r['images_per_s_per_gpu']:.1f}", f"{100 * r['mfu']:.1f}%", f"{r['peak_memory_gib']:.1f}",
                 f"{100 * r['data_wait']:.1f}%", f"{r['warmup_s']:.1f}"] if ok else [""] * 5
        strategy = r["strategy"] if r["strategy"] != "fsdp" else "auto (FSDP needs CUDA)" if check.smoke else \
            f"fsdp x{r.get('devices', torch.cuda.device_count())}"
        lines.append(f"| {r['method']} | {r['precision']} | {'on' if r['compile'] else 'off'} | {r['input']} | "
                     f"{strategy} | {r.get('batch_size', check.batch_sizes[r['method']])} | " + " | ".join(cells)
                     + f" | {r.get('status', 'not run').replace('|', '/')} |")
    return "\n".join(lines)


def make_check(args: argparse.Namespace, tmp: Path) -> Check:
    smoke, quick = args.cpu_smoke, args.quick
    precisions = args.precisions or ("32-true,bf16-mixed" if smoke else "bf16-mixed" if quick else "bf16-mixed,16-mixed")
    batch_sizes = {m: SMOKE_BATCH for m in BATCH_SIZES} if smoke else dict(BATCH_SIZES)
    batch_sizes.update({m: int(n) for m, n in (pair.split("=") for pair in args.batch_sizes.split(",") if pair)})
    workers = args.workers if args.workers is not None else 1 if smoke else min(10, max(1, (os.cpu_count() or 2) - 2))
    steps = args.steps or (2 if smoke else 10 if quick else 20)
    data_dir = Path(args.data_dir) if args.data_dir else tmp / "images"
    return Check(args, smoke, steps, precisions.split(","), args.methods.split(","), batch_sizes, workers, data_dir, tmp)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        check = make_check(args, Path(tmp))
        if check.smoke:  # inductor would build C++ for minutes on a small CPU: dynamo traces, the graphs run eagerly
            torch.nn.Module.compile = functools.partialmethod(torch.nn.Module.compile, backend="eager")
            torch.set_num_threads(1)  # tiny matrices: a second OpenMP thread only waits (15 ms a matmul when shared)
        else:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            torch.set_float32_matmul_precision("high")
        L.seed_everything(0, verbose=False)
        device_peak(check)
        counts = {"train": check.steps * max(check.batch_sizes.values()), "probe": 40, "test": 20} if check.smoke \
            else {"train": check.steps * max(check.batch_sizes.values()), **EVAL_IMAGES}
        make_images(check.data_dir, SMOKE_SIDE if check.smoke else IMAGE_SIDE, counts)
        if args.fsdp_only:
            row = plan(check)[-1]
            run_row(check, row)
            return 0 if row["status"].startswith("ok") else 1
        rows = plan(check)
        reserve = 45.0 if rows[-1]["strategy"] == "fsdp" and not check.smoke else 0.0
        for row in rows:
            if over_budget(check, row, reserve):
                row["status"] = f"skipped: past --budget-s {check.args.budget_s:.0f}"
            else:
                run_row(check, row)
        report(check, rows)
        failed = [r for r in rows if r.get("status", "").startswith("FAIL")]
        print(f"[gpu_check] {len(rows) - len(failed)} of {len(rows)} rows passed or were skipped; "
              f"{len(failed)} failed; {time.perf_counter() - check.started:.0f} s", flush=True)
        return 1 if failed else 0


def report(check: Check, rows: list[dict[str, Any]]) -> None:
    """Print the table; record the rows (not the smoke's) and write the table, rows and grid to ``--out``."""
    text = table(check, rows)
    print(text, flush=True)
    if not (check.smoke or check.args.no_record):
        for r in rows:
            if r.get("status", "").startswith("ok"):
                record({"name": f"gpu_check {r['method']} {r['precision']} compile={r['compile']} {r['input']} "
                                f"{r['strategy']}", **r, "peak_tflops": check.peak_tflops})
    if check.args.out:
        out = Path(check.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.md").write_text(text + "\n")
        meta = {"device": "cpu" if check.smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
                "lightning": L.__version__, "timm": timm.__version__, "steps": check.steps,
                "peak_tflops": check.peak_tflops, "peak_source": check.peak_source,
                "matmul_tflops": check.matmul_tflops, "wall_s": time.perf_counter() - check.started}
        (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
        for path in check.artifacts:
            if path.is_file():
                shutil.copy(path, out / f"reconstruction{path.suffix}")


if __name__ == "__main__":
    sys.exit(main())
