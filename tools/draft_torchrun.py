"""Train a ComfyUI workflow's DRaFT Trainer data-parallel on several GPUs (or CPU processes).

    torchrun --nproc_per_node=4 tools/draft_torchrun.py workflow_api.json \\
        --comfyui /path/to/ComfyUI --base-directory /path/to/ComfyUI

``workflow_api.json`` is what ComfyUI's "Export (API)" writes. Every process (rank) runs ComfyUI's
own engine in-process (``execution.PromptExecutor``; no server, no frontend): it loads the custom
nodes and the models the workflow names, then executes the DRaFT Trainer node, whose training runs
data-parallel (``training/distributed.py``): rank ``r`` of ``N`` rolls out rows ``r*b ... r*b+b-1``
of every global batch (``b`` = the node's batch_size), the LoRA gradients are averaged over the
ranks before clipping, so N ranks with batch b give the LoRA one process with batch N*b gives.
Rank 0 alone writes the periodic saves (same files, metadata and resume side file as the node),
prints the progress and, after training, runs the rest of the workflow (Save LoRA, evaluations,
previews) in one process. The other ranks stay quiet (errors only).

* backend: NCCL when CUDA is available (each rank on GPU ``LOCAL_RANK``), else gloo on the CPU;
  ``--cpu`` forces the CPU. Without torchrun it runs as one process (a plain headless run).
* ``--set NODE.INPUT=VALUE`` overrides a widget of the exported workflow (VALUE as JSON, or a
  plain string), e.g. ``--set 12.batch_size=2 --set 12.resume_lora='"draft/x_step00100.safetensors"'``.
* resume: set the trainer's ``resume_lora`` to a periodic save; it resumes with any number of
  ranks (the side file holds optimizer state, step count and reward history; the draws of an
  update depend only on the seed, the step and the global row).
* exit status: 0 done; 1 a node failed (its message is printed, by every rank where it failed);
  2 bad arguments or workflow. If a rank dies, torchrun ends the others and names the failed
  rank; the last periodic save (written atomically between updates) stays intact.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER = "DRaFTTrainer"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", help="the workflow in ComfyUI's API format (Export (API))")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"),
                   help="the ComfyUI checkout (default: $COMFYUI_PATH)")
    p.add_argument("--base-directory", default=None,
                   help="ComfyUI base directory: models/, custom_nodes/, output/ (default: the checkout)")
    p.add_argument("--trainer", default=None, help="node id of the DRaFT Trainer (default: the only one)")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override a widget value of the workflow (VALUE as JSON, else a string)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (gloo) even if CUDA is available")
    return p.parse_args(argv)


def fail(message: str, code: int = 2):
    print(f"draft_torchrun: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def load_workflow(path: str, overrides) -> dict:
    """The API-format prompt ``{node id: {"class_type", "inputs"}}`` with ``overrides`` applied."""
    try:
        with open(path) as f:
            prompt = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read the workflow {path}: {e}")
    if isinstance(prompt, dict) and "nodes" in prompt and "links" in prompt:
        fail(f"{path} is a UI-format workflow; in ComfyUI use Workflow > Export (API) and pass that file")
    if not isinstance(prompt, dict) or not all(isinstance(v, dict) and "class_type" in v
                                               for v in prompt.values()):
        fail(f"{path} is not an API-format workflow ({{node id: {{class_type, inputs}}}})")
    for item in overrides:
        key, sep, value = item.partition("=")
        node, dot, name = key.partition(".")
        if not sep or not dot or node not in prompt:
            fail(f"--set {item!r}: expected NODE.INPUT=VALUE with a node id of the workflow")
        try:
            value = json.loads(value)
        except ValueError:
            pass
        prompt[node]["inputs"][name] = value
    return prompt


def select_device(cpu: bool) -> None:
    """Under torchrun, show each rank only its own GPU (before torch initialises CUDA), so that
    ComfyUI's model management, which uses the current device, puts the rank on GPU LOCAL_RANK."""
    if cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return
    if "LOCAL_RANK" not in os.environ:
        return
    local = int(os.environ["LOCAL_RANK"])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v for v in visible.split(",") if v.strip()] if visible else None
    if ids is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(local)
    elif local < len(ids):
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[local]


class HeadlessServer:
    """What ComfyUI's executor and custom nodes expect of ``server.PromptServer.instance``, without
    a web server: routes are collected and never served, messages are dropped."""

    def __init__(self):
        from aiohttp import web
        self.routes = web.RouteTableDef()
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.supports = []
        self.number = 0

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


def setup_comfyui(comfyui: str, base: str | None, cpu: bool):
    """Import ComfyUI from ``comfyui`` with ``base`` as its base directory; load the built-in
    extra nodes and the custom nodes (this pack included). Returns ``(nodes, execution, server)``."""
    if not comfyui or not os.path.isfile(os.path.join(comfyui, "main.py")):
        fail("--comfyui (or $COMFYUI_PATH) must name a ComfyUI checkout (the folder with main.py)")
    comfyui = os.path.abspath(comfyui)
    if comfyui not in sys.path:
        sys.path.insert(0, comfyui)
    import torch
    from comfy.cli_args import args
    if base:
        if not os.path.isdir(base):
            fail(f"--base-directory {base}: no such folder")
        args.base_directory = os.path.abspath(base)
    if cpu or not torch.cuda.is_available():
        args.cpu = True
    import folder_paths
    import utils.extra_config  # noqa: F401  (as main.py: ComfyUI's utils package, before anything
    # can put comfy/utils.py on the path under the same name)
    folder_paths.add_model_folder_path("loras", os.path.join(folder_paths.get_output_directory(), "loras"))
    import server
    headless = HeadlessServer()
    server.PromptServer.instance = headless
    import execution
    import nodes
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    if TRAINER not in nodes.NODE_CLASS_MAPPINGS:  # the pack is not in custom_nodes: load it from here
        asyncio.run(nodes.load_custom_node(REPO))
    if TRAINER not in nodes.NODE_CLASS_MAPPINGS:
        fail(f"the DRaFT nodes did not load from {REPO} (see the log above)", 1)
    return nodes, execution, headless


def node_error(executor) -> str:
    for event, data in executor.status_messages:
        if event == "execution_error":
            return (f"node {data['node_id']} ({data['node_type']}) failed: {data['exception_type']}: "
                    f"{data['exception_message']}\n{''.join(data.get('traceback') or [])}")
        if event == "execution_interrupted":
            return f"node {data['node_id']} ({data['node_type']}) was interrupted"
    return "execution failed"


def main(argv=None) -> int:
    opts = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, stream=sys.stdout,
                        format=f"[rank {rank}] %(message)s" if world > 1 else "%(message)s",
                        force=True)
    select_device(opts.cpu)
    prompt = load_workflow(opts.workflow, opts.set)
    nodes, execution, headless = setup_comfyui(opts.comfyui, opts.base_directory, opts.cpu)

    import torch
    import torch.distributed as dist
    if "RANK" in os.environ:  # torchrun
        backend = "gloo" if opts.cpu or not torch.cuda.is_available() else "nccl"
        if backend == "nccl":
            torch.cuda.set_device(0)  # the one GPU this rank sees (select_device)
        dist.init_process_group(backend)
        if rank == 0:
            logging.info("DRaFT data-parallel: %d ranks, %s", world, backend)

    trainers = [k for k, v in prompt.items() if v["class_type"] == TRAINER]
    trainer = opts.trainer or (trainers[0] if len(trainers) == 1 else None)
    if trainer not in trainers:
        fail(f"the workflow has DRaFT Trainer nodes {trainers}; name one with --trainer" if trainers
             else "the workflow has no DRaFT Trainer node")
    prompt_id = uuid.uuid4().hex
    valid, error, outputs, node_errors = asyncio.run(
        execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        details = "; ".join(f"node {n} ({e['class_type']}): " + ", ".join(
            f"{r['message']}: {r['details']}" for r in e["errors"]) for n, e in node_errors.items())
        fail(f"the workflow does not validate: {error['message']}: {error['details']} {details}")

    executor = execution.PromptExecutor(headless)
    t0 = time.perf_counter()
    executor.execute(prompt, prompt_id, {}, [trainer])  # every rank: the data-parallel training
    if not executor.success:
        print(f"draft_torchrun: rank {rank}: {node_error(executor)}", file=sys.stderr, flush=True)
        return 1
    seconds = time.perf_counter() - t0
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return 0
    executor.execute(prompt, prompt_id, {}, outputs)  # rank 0: the rest of the workflow, as usual
    if not executor.success:
        print(f"draft_torchrun: {node_error(executor)}", file=sys.stderr, flush=True)
        return 1
    ui = executor.history_result["outputs"]
    print(json.dumps({"trainer": trainer, "ranks": world, "train_seconds": round(seconds, 2),
                      "summary": (ui.get(trainer, {}).get("text") or [None])[0],
                      "outputs": {k: v.get("text") for k, v in ui.items() if v.get("text")}}),
          flush=True)
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record
    sys.exit(record(main)())
