"""``make bench``: peak memory and wall time of one DRaFT update against plain sampling.

For ``--steps`` (50) DDIM steps on a diffusers ``UNet2DConditionModel`` with random weights (EPS
parameterisation in sigma space, SD1.x alphas), rank-8 LoRA deltas on every attention projection
(``training.lora.wrap_module``), a small conv decoder to [0, 1] images and ``colour_reward``, it
measures, each in a fresh subprocess:

* ``sample``: ``DifferentiableSampler.sample()`` + decode of the batch, no gradient (the baseline);
* ``K=k``: one ``DraftTrainer.step()`` (rollout, decode, reward, backward, clip, AdamW) for DRaFT-K
  (``draft_k``; K = T is full DRaFT, method ``draft``), with and without checkpointing;
* ``LV n=2``: the same for DRaFT-LV with two re-noised samples, with and without checkpointing;
* ``heldout_eval``: one evaluation of the default DRaFT Held-out Check (4 held-out prompts x 4
  seeds, sampled and decoded in batches, scored by the training reward, the similarity across
  seeds, the best LoRA copied): the training time the check adds every N updates.
  ``heldout_check_overhead`` is that time over the time of the same 16 plain no-grad samples
  (``sample`` is one batch of ``--batch``); the bench's 4 prompts stand for the held-out ones
  (the same conditioning cost).

Time: median of ``--reps`` repetitions after a warm-up. Memory (one iteration, after model set-up
and a no-grad warm-up sampling):

* CPU: ``peak RSS - RSS before the iteration`` (the peak is reset through ``/proc/self/clear_refs``
  and freed heap pages are returned with ``malloc_trim`` first, so the difference is what the
  iteration adds); the process's total peak RSS is reported too;
* CUDA: ``max_memory_allocated - memory_allocated`` before the iteration, and the total peak;
* both: the peak of live bytes saved for backward (``torch.autograd.graph.saved_tensors_hooks``,
  distinct storages, model weights excluded) -- the activation memory that checkpointing controls.

The checkpointed configurations are the way the trainer's ``auto`` takes on a device with room
(every row at once, no block checkpointing). Prints a table and, as its last line, one JSON object
with ``peak_mem_ratio_k50_k1`` (checkpointed, ratio of the iteration's added peak memory),
``time_ratio_draft1_vs_sampling``, ``time_ratio_lv2_vs_sampling``, ``time_ratio_full_vs_sampling``,
``time_ratio_draft1_vs_floor`` and ``time_ratio_full_vs_floor`` (over the ideal (T + 3K)/T of
sampling), the peers' figures (:mod:`.peers`: ``auto_time_vs_trl_*`` ...) and all raw figures.

    .venv/bin/python -m tools.measure.speed.bench                     # CPU, --model small
    .venv/bin/python -m tools.measure.speed.bench --device cuda --model sd15 --resolution 512

(from the repository root). The models (:class:`tools.measure.setup.Setup`) are shared with
:mod:`.peers` (the side-by-side with TRL and ComfyUI, run at the end) and :mod:`.cfg_gradient_study`.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

from tools.measure.setup import REPO, Setup, last_json_line, way_kwargs, worker_command

TARGETS = {  # key: (limit, description)
    "peak_mem_ratio_k50_k1": (1.25, "peak memory K=T / K=1, checkpointed"),
    "time_ratio_draft1_vs_sampling": (1.2, "DRaFT-1 update / plain sampling"),
    "time_ratio_full_vs_sampling": (4.5, "full DRaFT update / plain sampling"),
    # over the ideal of a per-step-checkpointed update, (T + 3K)/T x sampling: the T - K no-grad
    # steps, then per differentiated step a forward, its recompute and a backward (~2 forwards)
    "time_ratio_draft1_vs_floor": (1.05, "DRaFT-1 update / (T + 3)/T x sampling"),
    "time_ratio_full_vs_floor": (1.05, "full DRaFT update / 4 x sampling"),
    "heldout_check_overhead": (1.1, "held-out evaluation / its plain samples"),
}


def floor_ratio(steps: int, k: int) -> float:
    """The time of an ideal per-step-checkpointed DRaFT-K update over plain sampling: (T + 3K)/T
    (decode, reward and AdamW taken as free)."""
    return (steps + 3 * k) / steps

MODEL_DEFAULT_RESOLUTION = {"small": 256, "sd15": 512}


# ---------------------------------------------------------------------------------------------
# measures
# ---------------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class SavedBytes:
    """Peak of live bytes saved for backward (distinct storages, pre-existing tensors excluded).

    Only tensors autograd keeps under *these* hooks are seen: inside a non-reentrant checkpoint the
    checkpoint's own hooks take over (they store nothing), and the checkpoint's inputs are saved
    outside them -- so this is exactly the memory the autograd graph holds between forward and
    backward."""

    def __init__(self, exclude: set):
        self.exclude = exclude
        self.live: dict = {}
        self.current = 0
        self.peak = 0

    def pack(self, tensor):
        counter = self

        class Holder:
            __slots__ = ("tensor", "ptr")

            def __init__(self, t):
                self.tensor, self.ptr = t, None
                try:
                    storage = t.untyped_storage()
                except Exception:  # noqa: BLE001 - exotic tensor types: not counted
                    return
                ptr = storage.data_ptr()
                if ptr == 0 or ptr in counter.exclude:
                    return
                self.ptr = ptr
                entry = counter.live.get(ptr)
                if entry is None:
                    counter.live[ptr] = [1, storage.nbytes()]
                    counter.current += storage.nbytes()
                    counter.peak = max(counter.peak, counter.current)
                else:
                    entry[0] += 1

            def __del__(self):
                if self.ptr is None:
                    return
                entry = counter.live[self.ptr]
                entry[0] -= 1
                if entry[0] == 0:
                    counter.current -= entry[1]
                    del counter.live[self.ptr]

        return Holder(tensor)

    @staticmethod
    def unpack(holder):
        return holder.tensor


def measure_memory(fn, device, exclude: set) -> dict:
    import torch
    counter = SavedBytes(exclude)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"mem_measure": "cuda max_memory_allocated", "mem_before_mib": before / 2**20,
                "mem_peak_mib": peak / 2**20, "mem_added_mib": (peak - before) / 2**20,
                "mem_after_mib": (torch.cuda.memory_allocated() - before) / 2**20,
                "saved_peak_mib": counter.peak / 2**20}
    _malloc_trim()
    before = _proc_status_kib("VmRSS")
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS through /proc/self/clear_refs")
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        fn()
    peak = _proc_status_kib("VmHWM")
    return {"mem_measure": "RSS", "rss_before_mib": before / 1024,
            "rss_peak_mib": peak / 1024, "rss_added_mib": (peak - before) / 1024,
            "saved_peak_mib": counter.peak / 2**20}


def cpu_tensor_peak(fn) -> dict:
    """Peak of live CPU tensor bytes allocated during ``fn()`` -- the CPU counterpart of
    ``torch.cuda.max_memory_allocated`` minus what was allocated before.

    PyTorch's CPU allocator keeps no counter unless memory profiling is on; under
    ``torch.profiler.profile(profile_memory=True)`` it reports every allocation and free with its
    running total of the bytes allocated while profiling (``total_allocated``). The maximum of that
    total is the iteration's peak added tensor memory (frees of tensors allocated before ``fn`` are
    not credited, so it errs high)."""
    from torch.profiler import ProfilerActivity, profile
    from torch._C._profiler import _EventType

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, last = 0, (-1, 0)
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            total = event.extra_fields.total_allocated
            peak = max(peak, total)
            last = max(last, (event.start_time_ns, total))
        stack.extend(event.children)
    return {"mem_added_mib": peak / 2**20, "mem_after_mib": last[1] / 2**20}


# ---------------------------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------------------------
HELDOUT_SAMPLES = 16  # the default check: 4 prompts x 4 seeds


def make_runner(args, setup, config: dict):
    """``fn()`` running one iteration of ``config`` (an update, or sampling + decode)."""
    import torch
    from training.sampler import DifferentiableSampler, SamplerSettings
    from training.toy_models import colour_reward
    from training.trainer import DraftTrainer, TrainSettings

    kind = config["kind"]
    if kind == "draft_k":
        method = "draft" if config["k"] == args.steps else "draft_k"
        settings = SamplerSettings(method=method, k=config["k"],
                                   checkpointing=config["checkpointing"])
    elif kind == "draft_lv":
        settings = SamplerSettings(method="draft_lv", lv_samples=config["n"],
                                   checkpointing=config["checkpointing"])
    else:
        settings = SamplerSettings(method="draft_k", k=1)
    sampler = DifferentiableSampler(setup.denoise, setup.sigmas, settings)
    lean = {}
    if config.get("lean"):  # what DRaFT Trainer picks when nothing else fits the device
        from training.checkpointing import diffusers_decoder_units, diffusers_unet_units
        vae = getattr(setup.decoder, "vae", None)
        lean = way_kwargs("all", diffusers_unet_units(setup.unet),
                          diffusers_decoder_units(vae.decoder) if vae is not None else [])
    elif config.get("rows"):  # rows one at a time, nothing else
        lean = way_kwargs("rows")
    trainer = DraftTrainer(sampler, setup.decoder, colour_reward, setup.prompts, setup.lora,
                           setup.latent_shape,
                           TrainSettings(batch_size=args.batch, mixed_precision=args.mixed_precision),
                           device=setup.device, **lean)
    cuda = setup.device.type == "cuda"
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn((args.batch,) + setup.latent_shape, generator=g).to(setup.device)
    index = torch.arange(args.batch, device=setup.device) % len(setup.prompts)

    def sample():
        with torch.no_grad(), trainer._autocast():
            images = trainer.decode_images(sampler.sample(noise, index))  # as the trainer decodes
        float(images.float().mean())  # waits for the result
        if cuda:
            torch.cuda.synchronize()

    def train():
        report = trainer.step()
        if cuda:
            torch.cuda.synchronize()
        if report.skipped:
            raise RuntimeError(f"update skipped: {report.skip_reason}")

    check = None
    if kind == "heldout":  # the default check (no judge), as the trainer node builds it
        from training.heldout import HeldoutCheck, HeldoutSettings
        check = HeldoutCheck(HeldoutSettings(prompts=tuple(setup.prompts)), [],
                             reward_label="colour", prompt_offset=0, chunk=max(args.batch, 4),
                             decode_rows=args.batch)

    def evaluate():
        check.observe(check.evaluate(trainer), trainer.params)
        if cuda:
            torch.cuda.synchronize()

    fn = {"sample": sample, "heldout": evaluate}.get(kind, train)
    fn.sampler, fn.trainer, fn.noise, fn.index, fn.warmup = sampler, trainer, noise, index, sample
    return fn


def _init_worker(args):
    import torch
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    return Setup(args, device), device


def memory_worker(args, config: dict) -> dict:
    """Memory of one iteration of ``config``, in a fresh process."""
    setup, device = _init_worker(args)
    fn = make_runner(args, setup, config)
    fn.warmup()  # no-grad sampling: every kernel and code path of the rollout seen once
    result = measure_memory(fn, device, setup.weight_storages())
    if device.type == "cpu":  # a second (steady-state) iteration under the memory profiler
        result.update(cpu_tensor_peak(fn))
    return result


def _own_and_machine_jiffies():
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    busy, total = _cpu_jiffies()
    return (usage.ru_utime + usage.ru_stime) * os.sysconf("SC_CLK_TCK"), busy, total


def timing_worker(args, configs: list) -> dict:
    """Wall time of every configuration in one process, in interleaved rounds.

    Each round times the sampling baseline, then one iteration of every configuration, then the
    baseline again; a configuration's ratio for the round is its time over the mean of the round's
    two baseline times, and the reported ratio is the median over rounds. Interleaving makes the
    ratios robust to slow drifts of the machine's speed (other processes, clocks)."""
    setup, device = _init_worker(args)
    base_config = next(c for c in configs if c["kind"] == "sample")
    runners = {c["name"]: make_runner(args, setup, c) for c in configs}
    errors = {}
    base = runners[base_config["name"]]
    base()
    for name, fn in runners.items():  # warm-up: two iterations each (the first allocates state)
        try:
            fn()
            fn()
        except Exception as exc:  # noqa: BLE001 - e.g. CUDA out of memory: drop the config
            errors[name] = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
            _release(device)
    for name in errors:
        runners.pop(name)
    times = {name: [] for name in runners}
    ratios = {name: [] for name in runners}
    busy = []
    for _ in range(args.reps):
        own0, busy0, total0 = _own_and_machine_jiffies()
        round_times = {}
        for name, fn in list(runners.items()) + [("__base_end", base)]:
            start = time.perf_counter()
            fn()
            round_times[name] = time.perf_counter() - start
        own1, busy1, total1 = _own_and_machine_jiffies()
        if total1 > total0:
            busy.append(max(0.0, (busy1 - busy0 - (own1 - own0)) / (total1 - total0)))
        ref = 0.5 * (round_times[base_config["name"]] + round_times.pop("__base_end"))
        for name, t in round_times.items():
            times[name].append(t)
            ratios[name].append(t / ref)
    result = {"times_s": times, "ratios": ratios, "errors": errors, "others_cpu_rounds": busy}
    if args.components:
        result["components"] = components(args, setup, base.sampler, base.trainer, base.noise,
                                          base.index)
    return result


def _release(device):
    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def components(args, setup, sampler, trainer, noise, index) -> dict:
    """Milliseconds of the pieces of an update, to explain the ratios (no checkpointing)."""
    import torch
    from training.toy_models import colour_reward

    def sync():
        if setup.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, n):
        fn()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    x = sampler.initial_latent(noise)
    sigma = sampler.sigmas[-2].to(x.device).expand(x.shape[0])
    params = setup.lora.trainable_parameters()

    def step_nograd():
        with torch.no_grad(), trainer._autocast():
            setup.denoise(x, sigma, index)

    def step_fwd_bwd():
        with trainer._autocast():
            out = setup.denoise(x, sigma, index)
        torch.autograd.grad(out.float().square().mean(), params)

    def decode_nograd():
        with torch.no_grad(), trainer._autocast():
            trainer.decode_images(x)

    def decode_reward_fwd_bwd():
        xg = x.detach().requires_grad_(True)
        with trainer._autocast():
            loss = -colour_reward(trainer.decode_images(xg)).float().mean()
        torch.autograd.grad(loss, xg)

    def optimizer_step():
        for p in params:
            p.grad = torch.zeros_like(p)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    n = max(3, args.reps * 2)
    return {"step_nograd_ms": timed(step_nograd, n), "step_fwd_bwd_ms": timed(step_fwd_bwd, n),
            "decode_nograd_ms": timed(decode_nograd, n),
            "decode_reward_fwd_bwd_ms": timed(decode_reward_fwd_bwd, n),
            "adamw_ms": timed(optimizer_step, n)}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def configurations(args) -> list:
    configs = [{"name": "sample", "kind": "sample", "label": "plain sampling (no grad)"}]
    for ckpt in (True, False):
        for k in args.ks:
            label = "full DRaFT" if k == args.steps else "DRaFT-K"
            configs.append({"name": f"k{k}_{'ckpt' if ckpt else 'nockpt'}", "kind": "draft_k",
                            "k": k, "checkpointing": ckpt, "label": f"{label} K={k}"})
        configs.append({"name": f"lv{args.lv_samples}_{'ckpt' if ckpt else 'nockpt'}",
                        "kind": "draft_lv", "n": args.lv_samples, "checkpointing": ckpt,
                        "label": f"DRaFT-LV n={args.lv_samples}"})
    # The lean memory settings (block checkpointing, rows one at a time) that the trainer picks on
    # a device where the fast way does not fit: DRaFT-1, full DRaFT and DRaFT-LV.
    for k in sorted({1, args.steps} & set(args.ks)):
        label = "full DRaFT" if k == args.steps else "DRaFT-K"
        configs.append({"name": f"k{k}_lean", "kind": "draft_k", "k": k, "checkpointing": True,
                        "lean": True, "label": f"{label} K={k} lean"})
    configs.append({"name": f"lv{args.lv_samples}_lean", "kind": "draft_lv", "n": args.lv_samples,
                    "checkpointing": True, "lean": True, "label": f"DRaFT-LV n={args.lv_samples} lean"})
    # auto's second choice (rows one at a time, no blocks), against its first (lv2_ckpt) and the
    # leanest (lv2_lean): the order of auto's ways is the order of their measured times
    configs.append({"name": f"lv{args.lv_samples}_rows", "kind": "draft_lv", "n": args.lv_samples,
                    "checkpointing": True, "rows": True,
                    "label": f"DRaFT-LV n={args.lv_samples} rows 1x1"})
    configs.append({"name": "heldout_eval", "kind": "heldout",
                    "label": "held-out check: 1 evaluation (16 samples)"})
    return configs


# glibc settings per kind of worker:
# * timing: keep freed memory in the process (no trimming, no per-allocation mmap) so that timed
#   iterations do not page-fault memory back in from the kernel (first-touch faults are slow and
#   erratic in VMs);
# * memory: serve every block of 64 KiB or more with its own mmap, returned to the kernel when
#   freed, so RSS follows the memory actually in use. With glibc's defaults the heap fragments:
#   small long-lived objects (autograd nodes, each step's latent) land between the activations a
#   step frees, and the next step's activations no longer fit there, so RSS grows by ~10 MiB per
#   checkpointed step that holds nothing (measured: +490 MiB RSS after a K=50 checkpointed rollout
#   with default glibc, +50 MiB with this setting; tensor bytes are the same).
WORKER_ENV = {
    "time": {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40)},
    "memory": {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**10)},
}


def _cpu_jiffies():
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def run_worker(args, mode: str, payload) -> dict:
    """Run ``--worker-<mode> payload`` in a fresh process; its last stdout line is its JSON."""
    cmd = worker_command(__spec__.name, f"--worker-{mode}", json.dumps(payload))
    cmd += worker_args(args)
    env = dict(os.environ, **WORKER_ENV[mode])
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              cwd=REPO, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    line = last_json_line(proc.stdout)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        if proc.returncode < 0:
            tail.append(f"killed by signal {-proc.returncode} (out of memory?)")
        return {"error": " | ".join(tail)[-300:] or f"exit status {proc.returncode}"}
    result = json.loads(line)
    result["process_s"] = time.perf_counter() - start
    return result


def worker_args(args) -> list:
    out = ["--device", args.device, "--model", args.model, "--resolution", str(args.resolution),
           "--steps", str(args.steps), "--reps", str(args.reps), "--threads", str(args.threads),
           "--batch", str(args.batch), "--rank", str(args.rank), "--cfg", str(args.cfg),
           "--decoder", args.decoder, "--mixed-precision", args.mixed_precision,
           "--lv-samples", str(args.lv_samples), "--ks", ",".join(str(k) for k in args.ks)]
    if not args.components:
        out.append("--no-components")
    return out


def machine_info(args) -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "threads": args.threads, "logical_cpus": os.cpu_count()}
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        info["cpu"] = m.group(1).strip() if m else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        info["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
    return info


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def rnd(value, digits=3):
    return None if value is None else round(value, digits)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def print_table(args, configs, results):
    cpu = args.device == "cpu"
    print()
    if cpu:
        print("memory of one iteration (model loaded, after a no-grad warm-up), each configuration "
              "in a fresh process:")
        print("  tensors  = peak CPU tensor bytes allocated during the iteration (PyTorch's CPU "
              "allocator via the memory profiler; the counterpart of cuda.max_memory_allocated)")
        print("  RSS add  = peak RSS during the iteration minus RSS before it (everything: tensors, "
              "autograd graph, Python objects; glibc mmaps blocks >= 64 KiB so freed memory is "
              "returned); RSS peak = the process's total")
    else:
        print("memory of one iteration: tensors = torch.cuda.max_memory_allocated minus allocated "
              "before it; peak = max_memory_allocated (weights included)")
    print("  saved    = peak live bytes autograd holds for backward (saved_tensors_hooks)")
    print(f"time: one process, {args.reps} interleaved rounds after two warm-up iterations; "
          f"median time, and median over rounds of time / the round's sampling time")
    mem_cols = (f"{'tensors MiB':>11s} {'RSS add':>8s} {'RSS peak':>8s}" if cpu
                else f"{'tensors MiB':>11s} {'peak MiB':>9s}")
    header = (f"{'configuration':24s} {'ckpt':>4s} {'time s':>7s} {'x sample':>8s} {mem_cols} "
              f"{'saved MiB':>9s}")
    print(header)
    print("-" * len(header))
    rows = []
    for config in configs:
        res = results[config["name"]]
        ckpt = ("" if config["kind"] in ("sample", "heldout")
                else ("yes" if config["checkpointing"] else "no"))
        row = {"name": config["name"]}
        if "error" in res:
            print(f"{config['label']:24s} {ckpt:>4s}  {res['error'][:90]}")
            row["error"] = res["error"]
            rows.append(row)
            continue
        if "time_s" in res:
            timing = f"{res['time_s']:7.3f} {res['time_ratio']:8.2f}"
            row.update(time_s=round(res["time_s"], 4), time_min_s=round(min(res["times_s"]), 4),
                       time_ratio_vs_sampling=round(res["time_ratio"], 3))
        else:
            timing = f"{'-':>7s} {'-':>8s}"
            row["time_error"] = res.get("time_error")
        mem = (f"{res['mem_added_mib']:11.2f} {res['rss_added_mib']:8.1f} {res['rss_peak_mib']:8.0f}"
               if cpu else f"{res['mem_added_mib']:11.1f} {res['mem_peak_mib']:9.1f}")
        print(f"{config['label']:24s} {ckpt:>4s} {timing} {mem} {res['saved_peak_mib']:9.2f}"
              + (f"  timing failed: {res['time_error'][:60]}" if "time_error" in res else ""))
        row.update(mem_added_mib=round(res["mem_added_mib"], 3),
                   saved_peak_mib=round(res["saved_peak_mib"], 3))
        for key in ("rss_added_mib", "rss_peak_mib", "mem_peak_mib"):
            if key in res:
                row[key] = round(res[key], 1)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--model", choices=("small", "sd15"), default="small",
                        help="small: reduced-width UNet (64, 128), the CPU default; sd15: the full "
                             "SD1.5 UNet architecture (random weights)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels; the latent is 1/8 (default: small 256, sd15 512)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--ks", default="1,5,10,25,50",
                        help="comma-separated K values (K = steps is full DRaFT)")
    parser.add_argument("--lv-samples", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch.set_num_threads in every worker")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank)")
    parser.add_argument("--cfg", type=float, default=7.5,
                        help="classifier-free guidance scale (default 7.5, as DRaFT trains); 0 runs "
                             "one UNet branch")
    parser.add_argument("--decoder", choices=("small", "vae"), default="small",
                        help="small: a 4-conv upsampler; vae: the SD VAE decoder's architecture "
                             "(random weights)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--only", default="",
                        help="comma-separated configuration names (sample, k1_ckpt, k50_nockpt, "
                             "lv2_ckpt, ...); sample always runs")
    parser.add_argument("--no-components", dest="components", action="store_false",
                        help="skip the per-component timings of the sampling worker")
    parser.add_argument("--json-out", default="", help="also write the JSON object to this file")
    parser.add_argument("--no-peers", dest="peers", action="store_false",
                        help="skip the comparison with TRL's AlignProp and ComfyUI's KSampler "
                             "(tools.measure.speed.peers)")
    parser.add_argument("--peer-resolution", type=int, default=256,
                        help="image side of the peer comparisons (SD VAE decoder at this size)")
    parser.add_argument("--worker-memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-time", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.resolution is None:
        args.resolution = MODEL_DEFAULT_RESOLUTION[args.model]
    if args.resolution % 8:
        parser.error("--resolution must be a multiple of 8")
    args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    if any(not 1 <= k <= args.steps for k in args.ks):
        parser.error(f"every K must lie in [1, {args.steps}]")

    if args.worker_memory is not None or args.worker_time is not None:
        try:
            if args.worker_memory is not None:
                result = memory_worker(args, json.loads(args.worker_memory))
            else:
                result = timing_worker(args, json.loads(args.worker_time))
        except Exception as exc:  # noqa: BLE001 - reported by the driver
            text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            oom = "out of memory" in text.lower()
            result = {"error": ("out of memory: " if oom else "") + f"{type(exc).__name__}: {text}"}
        print(json.dumps(result), flush=True)
        return 0

    started = time.perf_counter()
    configs = configurations(args)
    if args.only:
        wanted = set(args.only.split(","))
        configs = [c for c in configs if c["name"] in wanted or c["name"] == "sample"]
    print(f"DRaFT bench: model {args.model}, {args.resolution}x{args.resolution} "
          f"(latent {args.resolution // 8}x{args.resolution // 8}), batch {args.batch}, "
          f"{args.steps} steps, LoRA rank {args.rank}, device {args.device}, {args.threads} threads, "
          f"cfg {args.cfg or 'off'}, decoder {args.decoder}, precision {args.mixed_precision}",
          flush=True)
    results = {}
    for config in configs:
        print(f"  memory {config['name']} ...", end="", flush=True)
        res = run_worker(args, "memory", config)
        results[config["name"]] = res
        print(f" {res['mem_added_mib']:.1f} MiB" if "mem_added_mib" in res
              else f" FAILED: {res['error']}", flush=True)
    timed = [c for c in configs if "error" not in results[c["name"]]]
    if any(c["kind"] == "sample" for c in timed):
        print(f"  timing {len(timed)} configurations in {args.reps} interleaved rounds ...",
              end="", flush=True)
        timing = run_worker(args, "time", timed)
        print(" done" if "error" not in timing else f" FAILED: {timing['error']}", flush=True)
    else:
        timing = {"error": "the sampling baseline failed"}
    for config in configs:
        res = results[config["name"]]
        name = config["name"]
        if "error" in timing:
            res.setdefault("time_error", timing["error"])
        elif name in timing["errors"]:
            res.setdefault("time_error", timing["errors"][name])
        elif name in timing["times_s"]:
            res["times_s"] = timing["times_s"][name]
            res["time_s"] = statistics.median(timing["times_s"][name])
            res["time_ratio"] = statistics.median(timing["ratios"][name])
    busy = timing.get("others_cpu_rounds") or []

    rows = print_table(args, configs, results)
    if busy:
        print(f"other processes' CPU use during the timed rounds: max {100 * max(busy):.0f}% of the "
              f"machine (timings are trustworthy near 0%)")

    comps = timing.get("components")
    t = args.steps
    if comps:
        print()
        print("components (ms, median): "
              + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in comps.items()))
        # Cost model: T - K no-grad steps; K steps of forward + recompute (= a no-grad step) +
        # backward; decode (+ recompute) + reward + backward; AdamW.
        s, fb = comps["step_nograd_ms"], comps["step_fwd_bwd_ms"]
        dec, dfb = comps["decode_nograd_ms"], comps["decode_reward_fwd_bwd_ms"]
        sample_ms = t * s + dec
        for k in sorted({1, t}):
            model = (t - k) * s + k * (s + fb) + (dec + dfb) + comps["adamw_ms"]
            name = f"k{k}_ckpt"
            got = results.get(name, {}).get("time_ratio")
            print(f"  checkpointed K={k}: measured {fmt(got, '.2f')} x sampling; from the components "
                  f"{model / sample_ms:.2f} x; ideal (T + 3K)/T = {floor_ratio(t, k):.2f} x")

    def get(name, key):
        return results.get(name, {}).get(key)

    k1, kt = "k1_ckpt", f"k{t}_ckpt"
    summary = {
        "peak_mem_ratio_k50_k1": ratio(get(kt, "mem_added_mib"), get(k1, "mem_added_mib")),
        "time_ratio_draft1_vs_sampling": rnd(get(k1, "time_ratio")),
        "time_ratio_lv2_vs_sampling": rnd(get(f"lv{args.lv_samples}_ckpt", "time_ratio")),
        "time_ratio_full_vs_sampling": rnd(get(kt, "time_ratio")),
        "time_ratio_draft1_vs_floor": rnd(None if get(k1, "time_ratio") is None else
                                          get(k1, "time_ratio") / floor_ratio(t, 1)),
        "time_ratio_full_vs_floor": rnd(None if get(kt, "time_ratio") is None else
                                        get(kt, "time_ratio") / floor_ratio(t, t)),
        # one evaluation over its samples' plain time (sample: one batch of args.batch)
        "heldout_check_overhead": rnd(None if get("heldout_eval", "time_ratio") is None else
                                      get("heldout_eval", "time_ratio") * args.batch / HELDOUT_SAMPLES),
        "saved_mem_ratio_k50_k1": ratio(get(kt, "saved_peak_mib"), get(k1, "saved_peak_mib")),
        "rss_added_ratio_k50_k1": ratio(get(kt, "rss_added_mib"), get(k1, "rss_added_mib")),
        "rss_peak_ratio_k50_k1": ratio(get(kt, "rss_peak_mib"), get(k1, "rss_peak_mib")),
        "nockpt_peak_mem_ratio_k50_k1": ratio(get(f"k{t}_nockpt", "mem_added_mib"),
                                              get("k1_nockpt", "mem_added_mib")),
        # the lean settings (block checkpointing, rows one at a time): cost in time, gain in memory
        "lean_time_ratio_draft1_vs_sampling": rnd(get("k1_lean", "time_ratio")),
        "lean_time_ratio_full_vs_sampling": rnd(get(f"k{t}_lean", "time_ratio")),
        "lean_time_ratio_lv2_vs_sampling": rnd(get(f"lv{args.lv_samples}_lean", "time_ratio")),
        "lean_peak_mem_ratio_k50_k1": ratio(get(f"k{t}_lean", "mem_added_mib"),
                                            get("k1_lean", "mem_added_mib")),
        "lean_over_fast_mem_k1": ratio(get("k1_lean", "mem_added_mib"), get(k1, "mem_added_mib")),
        "lean_over_fast_mem_lv2": ratio(get(f"lv{args.lv_samples}_lean", "mem_added_mib"),
                                        get(f"lv{args.lv_samples}_ckpt", "mem_added_mib")),
        "rows_time_ratio_lv2_vs_sampling": rnd(get(f"lv{args.lv_samples}_rows", "time_ratio")),
        "rows_over_fast_mem_lv2": ratio(get(f"lv{args.lv_samples}_rows", "mem_added_mib"),
                                        get(f"lv{args.lv_samples}_ckpt", "mem_added_mib")),
    }
    if get(kt, "rss_added_mib") is not None and get(k1, "rss_added_mib") is not None and t > 1:
        summary["rss_growth_per_ckpt_step_mib"] = round(
            (get(kt, "rss_added_mib") - get(k1, "rss_added_mib")) / (t - 1), 3)
    targets_met = {key: (None if summary[key] is None else summary[key] <= limit)
                   for key, (limit, _) in TARGETS.items()}
    print()
    for key, (limit, desc) in TARGETS.items():
        verdict = {True: "met", False: "MISSED", None: "not measured"}[targets_met[key]]
        print(f"{desc:40s} {fmt(summary[key], '.3f'):>7s}  (target <= {limit})  {verdict}")
    print(f"{'DRaFT-LV n=' + str(args.lv_samples) + ' update / plain sampling':40s} "
          f"{fmt(summary['time_ratio_lv2_vs_sampling'], '.3f'):>7s}")
    for key in ("lean_time_ratio_draft1_vs_sampling", "lean_time_ratio_full_vs_sampling",
                "lean_time_ratio_lv2_vs_sampling", "lean_over_fast_mem_k1", "lean_over_fast_mem_lv2",
                "rows_time_ratio_lv2_vs_sampling", "rows_over_fast_mem_lv2"):
        print(f"{key:40s} {fmt(summary[key], '.3f'):>7s}")
    if args.device == "cpu":
        print(f"{'RSS added K=T / K=1, checkpointed':40s} "
              f"{fmt(summary['rss_added_ratio_k50_k1'], '.3f'):>7s}  "
              f"({fmt(summary.get('rss_growth_per_ckpt_step_mib'), '.2f')} MiB more per "
              f"differentiated step)")
    if busy and max(busy) > 0.05:
        print(f"WARNING: other processes used up to {100 * max(busy):.0f}% of the CPU during the "
              f"bench; the timings are not reliable. Run it again on an idle machine.")
    peers = {}
    if args.peers:
        from tools.measure.speed import peers as bench_peers
        print("  peers: TRL AlignProp update and ComfyUI KSampler side by side ...", flush=True)
        peers = bench_peers.compare(bench_peers.parse(
            ["--steps", str(args.steps), "--resolution", str(args.peer_resolution),
             "--ksampler-resolution", str(args.peer_resolution), "--reps", str(max(5, args.reps)),
             "--threads", str(args.threads)]))
        for key, limit in {**bench_peers.TRL_TARGETS,
                           "no_grad_sampling_vs_ksampler": bench_peers.KSAMPLER_TARGET}.items():
            value = peers.get(key)
            verdict = "not measured" if value is None else ("met" if value <= limit else "MISSED")
            print(f"{key:40s} {fmt(value, '.3f'):>7s}  (target <= {limit})  {verdict}")
        for key in ("trl_error", "ksampler_error"):
            if key in peers:
                print(f"  {key}: {str(peers[key])[:300]}")
    total = time.perf_counter() - started
    print(f"total bench time {total:.0f} s")
    out = dict(summary)
    out.update(peers)
    out.update({
        "targets": {key: limit for key, (limit, _) in TARGETS.items()},
        "targets_met": targets_met,
        "memory_measure": ("CPU tensor allocator peak added by one iteration (torch.profiler "
                           "profile_memory)" if args.device == "cpu" else
                           "torch.cuda.max_memory_allocated added by one iteration"),
        "max_others_cpu": round(max(busy), 3) if busy else None,
        "settings": {"model": args.model, "resolution": args.resolution, "steps": args.steps,
                     "batch": args.batch, "lora_rank": args.rank, "cfg": args.cfg,
                     "decoder": args.decoder, "mixed_precision": args.mixed_precision,
                     "reps": args.reps, "device": args.device, "threads": args.threads},
        "machine": machine_info(args),
        "components_ms": None if not comps else {k: round(v, 3) for k, v in comps.items()},
        "results": rows,
        "bench_seconds": round(total, 1),
    })
    line = json.dumps(out)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    print(line)
    missing = [key for key in ("peak_mem_ratio_k50_k1", "time_ratio_draft1_vs_sampling",
                               "time_ratio_lv2_vs_sampling", "time_ratio_full_vs_sampling")
               if summary[key] is None]
    if missing:
        print(f"bench incomplete: {', '.join(missing)} not measured (see the errors above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
