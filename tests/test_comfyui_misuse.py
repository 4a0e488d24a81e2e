"""Hostile inputs, Cancel at every moment and resume edge cases through a real ComfyUI server
(marker ``comfyui``): every bad input is refused before a model is loaded or an iteration runs,
once, naming the input; every LoRA file says exactly how many updates its weights hold."""
import os
import time

import pytest
import torch

from conftest import comfyui_path
from comfy_server import post_prompt
from test_comfyui_nodes import LORA_NODE, OPTIMIZER_NODE, SAVING_NODE, free, trainer_graph

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def server():
    from comfy_server import ComfyServer, tiny_checkpoint
    path = comfyui_path()
    with ComfyServer(path, checkpoint=tiny_checkpoint(path)) as srv:
        yield srv


def all_files(srv):
    out = set()
    for root, _, files in os.walk(srv.loras_dir):
        out |= {os.path.relpath(os.path.join(root, f), srv.loras_dir) for f in files}
    return out


def trainer_run_id(srv):
    return srv.get("/draft/status").get("4", {}).get("run")


def errors_by_node(body):
    return {node: v["errors"] for node, v in body["node_errors"].items()}


def problem_lines(text):
    """The ``- input: problem`` lines of a DRaFT input error, as {input: problem}."""
    lines = [line[2:] for line in text.splitlines() if line.startswith("- ")]
    out = {}
    for line in lines:
        name, _, problem = line.partition(": ")
        assert name not in out, f"{name} reported twice:\n{text}"
        out[name] = problem
    return out


def metadata(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return f.metadata()


def state_step(lora_path):
    return int(metadata(lora_path[: -len(".safetensors")] + ".draft_state")["draft_state.step"])


class Running:
    """``with Running(srv, graph) as prompt_id:`` queues ``graph``; on leaving (also when an
    assertion failed) the run is interrupted and waited for, so it never blocks the next test."""

    def __init__(self, srv, graph):
        self.srv, self.graph = srv, graph

    def __enter__(self):
        self.prompt_id = self.srv.queue(self.graph)
        return self.prompt_id

    def __exit__(self, *exc):
        self.srv.post("/interrupt", {})
        self.srv.wait(self.prompt_id, timeout=900)


def wait_status(srv, pred, timeout=900):  # generous: the CI machines' CPUs are shared
    deadline = time.time() + timeout
    st = {}
    while time.time() < deadline:
        st = srv.get("/draft/status").get("4", {})
        if pred(st):
            return st
        time.sleep(0.05)
    raise AssertionError(f"status never matched: {st}")


# -- refused when queued ----------------------------------------------------------------------------
QUEUE_TIME_CASES = [
    # (node, input, value): out of range or not a choice; ComfyUI's own checks, one message each
    ("4", "iterations", 0), ("4", "steps", 0), ("4", "width", 8), ("4", "cfg", 31.0),
    ("4", "batch_size", 0), ("4", "learning_rate", 0.0), ("4", "seed", -5),
    ("4", "scheduler", "bogus"), ("4", "prompt_set", "nope"),
    # the trainer's settings on its optional nodes: refused on their own node
    (LORA_NODE, "lora_rank", 9999), (LORA_NODE, "lora_alpha", 0.0),
    (LORA_NODE, "target_modules", "everything"), (OPTIMIZER_NODE, "mixed_precision", "fp8"),
    (OPTIMIZER_NODE, "grad_clip", -1.0), (OPTIMIZER_NODE, "grad_accumulation", 0),
    (OPTIMIZER_NODE, "weight_decay", 2.0), (OPTIMIZER_NODE, "kl_coeff", float("inf")),
    (SAVING_NODE, "save_every", -1), (SAVING_NODE, "preview_every", -2),
    ("3", "k", 0), ("3", "eta", 1.5), ("3", "method", "DRaFT-Z"), ("3", "lv_samples", 100),
    ("2", "statistic", "beauty"),
    # names other systems cannot hold, or outside models/loras: our validate_inputs
    ("4", "lora_name", "draft/a:b"), ("4", "lora_name", "CON"), ("4", "lora_name", "draft./x"),
    ("4", "lora_name", "../escape"), ("4", "lora_name", ""), ("4", "lora_name", "a\x01b"),
    ("5", "filename_prefix", "out|put"), ("5", "filename_prefix", "/tmp/abs"),
    ("5", "filename_prefix", "x?"),
    # a resume file that is not there; a number (an old 24-widget trainer's grad_clip, shifted)
    ("4", "resume_lora", "gone/missing.safetensors"), ("4", "resume_lora", 10.0),
]


def test_every_bad_input_is_refused_when_queued_with_one_message_naming_it(server):
    files, run = all_files(server), trainer_run_id(server)
    for node, name, value in QUEUE_TIME_CASES:
        graph = trainer_graph(server.ckpt_name)
        del graph["6"]  # Save LoRA is then the only output (see the test below for why)
        graph[node]["inputs"][name] = value
        status, body = post_prompt(server, graph)
        assert status == 400, (name, value, body)
        errors = errors_by_node(body)
        assert list(errors) == [node] and len(errors[node]) == 1, (name, value, errors)
        problems = problem_lines(errors[node][0]["details"])
        assert list(problems) == [name], (name, value, errors)
        assert repr(value)[:20] in problems[name] or name in ("lora_name", "filename_prefix"), problems
    assert all_files(server) == files and trainer_run_id(server) == run  # nothing ran


def test_several_bad_inputs_give_one_error_with_one_line_each(server):
    graph = trainer_graph(server.ckpt_name)
    graph["4"]["inputs"].update(steps=0, lora_name="a:b", resume_lora="missing.safetensors",
                                scheduler="nope", cfg=float("inf"))
    graph["3"]["inputs"].update(k_min=5, k_max=3)
    status, body = post_prompt(server, graph)
    assert status == 400
    errors = errors_by_node(body)
    assert sorted(errors) == ["3", "4"] and all(len(e) == 1 for e in errors.values()), errors
    assert list(problem_lines(errors["4"][0]["details"])) == [
        "steps", "scheduler", "cfg", "lora_name", "resume_lora"]  # the node's input order
    assert list(problem_lines(errors["3"][0]["details"])) == ["k_min"]
    assert "models/loras" in problem_lines(errors["4"][0]["details"])["resume_lora"]


# -- refused at the start of the trainer, before any model is loaded or iteration runs ----------
def run_expecting_refusal(srv, graph):
    free(srv)
    files, run, log_start = all_files(srv), trainer_run_id(srv), len(srv.log())
    status, body = post_prompt(srv, graph)
    assert status == 200, body
    entry = srv.wait(body["prompt_id"], timeout=900)
    assert entry["status"]["status_str"] == "error"
    err = next(d for n, d in entry["status"]["messages"] if n == "execution_error")
    assert err["node_id"] == "4", err
    log = srv.log()[log_start:]
    # the UNet never went to the device (only the checkpoint's CLIP, which ComfyUI loads itself)
    assert "Requested to load BaseModel" not in log, log[-2000:]
    assert trainer_run_id(srv) == run and all_files(srv) == files  # no iteration, no file
    return err["exception_message"]


def test_a_bad_save_lora_prefix_stops_the_trainer_even_when_another_output_is_valid(server):
    """ComfyUI runs the valid outputs of a prompt (here the reward-curve preview) and drops the
    invalid one (Save LoRA): the trainer must then refuse to start, or its result would be lost."""
    graph = trainer_graph(server.ckpt_name)
    graph["5"]["inputs"]["filename_prefix"] = "out|put"
    status, body = post_prompt(server, graph)
    assert status == 200 and list(body["node_errors"]) == ["5"], body
    free(server)
    files, run = all_files(server), trainer_run_id(server)
    entry = server.wait(body["prompt_id"], timeout=900)
    err = next(d for n, d in entry["status"]["messages"] if n == "execution_error")
    assert err["node_id"] == "4" and "filename_prefix" in err["exception_message"], err
    assert "node 5" in err["exception_message"], err
    assert trainer_run_id(server) == run and all_files(server) == files


def test_sampler_settings_against_the_schedule_and_other_cross_checks(server):
    graph = trainer_graph(server.ckpt_name, method="DRaFT-K", steps=6)
    graph["3"]["inputs"]["k"] = 8
    graph["4"]["inputs"]["width"] = 68  # the widget's step (8) is not enforced by ComfyUI
    graph["4"]["inputs"]["cfg"] = float("nan")  # JSON NaN passes ComfyUI's range check
    graph["4"]["inputs"]["prompts"] = "# only a comment"
    status, body = post_prompt(server, graph)  # NaN and the empty prompt list: refused when queued
    assert status == 400
    assert list(problem_lines(errors_by_node(body)["4"][0]["details"])) == ["prompts", "cfg"]
    graph["4"]["inputs"].update(cfg=3.0, prompts="a cat")
    msg = run_expecting_refusal(server, graph)  # these need the connected sampler and VAE
    assert list(problem_lines(msg)) == ["sampler", "width"], msg
    assert "k = 8" in msg and "6" in msg and "multiple of 8" in msg, msg
    # random K beyond the schedule, and a custom SIGMAS schedule
    graph = trainer_graph(server.ckpt_name, method="random K (AlignProp)", steps=6)
    graph["3"]["inputs"].update(k_min=1, k_max=9)
    assert "k_max = 9" in run_expecting_refusal(server, graph)
    graph = trainer_graph(server.ckpt_name, method="DRaFT-K")
    graph["3"]["inputs"]["k"] = 5
    graph["7"] = {"class_type": "BasicScheduler", "inputs": {
        "model": ["1", 0], "scheduler": "simple", "steps": 3, "denoise": 1.0}}
    graph["4"]["inputs"]["sigmas"] = ["7", 0]
    assert "k = 5" in run_expecting_refusal(server, graph)


# -- iteration accounting on Cancel -----------------------------------------------------------------
def test_cancel_inside_the_first_update_writes_nothing(server):
    files = all_files(server)
    # full DRaFT through 40 steps: the first update takes seconds, Cancel lands inside it
    graph = trainer_graph(server.ckpt_name, iterations=50, seed=51, lora_name="draft/cancel_first",
                          method="DRaFT (full)", steps=40)
    before = trainer_run_id(server)
    with Running(server, graph) as prompt_id:
        st = wait_status(server, lambda s: s.get("status") == "running" and s.get("run") != before)
        assert st["iteration"] == 0
        server.post("/interrupt", {})
        entry = server.wait(prompt_id, timeout=900)
    from comfy_server import status_messages
    assert "execution_interrupted" in status_messages(entry)
    final = server.get("/draft/status")["4"]
    assert final["status"] == "interrupted" and final["iteration"] == 0 and final["saved"] is None, final
    assert "nothing saved" in final.get("text", ""), final
    assert all_files(server) == files  # no LoRA, no side file, no temporary file


def test_cancel_mid_run_saves_n_finished_updates_labelled_n_and_resume_continues_at_n_plus_1(server):
    from safetensors.torch import load_file
    graph = trainer_graph(server.ckpt_name, iterations=100, seed=61, lora_name="draft/cancel_mid")
    before = trainer_run_id(server)
    with Running(server, graph):
        wait_status(server, lambda s: s.get("run") != before and s.get("iteration", 0) >= 2)
    final = server.get("/draft/status")["4"]
    n = final["iteration"]
    assert final["status"] == "interrupted" and 2 <= n < 100 and len(final["rewards"]) == n
    path = final["saved"]
    assert os.path.basename(path) == f"cancel_mid_step{n:05d}_partial.safetensors", path
    meta = metadata(path)
    assert meta["draft_iteration"] == str(n) and meta["draft_partial"] == "true"
    assert state_step(path) == n

    # resume: the next update is n + 1, and the result equals n + 1 straight updates
    resumed = trainer_graph(server.ckpt_name, iterations=n + 1, seed=61, lora_name="draft/cancel_mid_resumed")
    resumed["4"]["inputs"]["resume_lora"] = os.path.relpath(path, server.loras_dir)
    out = server.run_prompt(resumed)
    st = server.get("/draft/status")["4"]
    assert st["iteration"] == n + 1 and len(st["rewards"]) == n + 1
    straight = server.run_prompt(trainer_graph(server.ckpt_name, iterations=n + 1, seed=61,
                                               lora_name="draft/cancel_mid_straight"))
    a, b = (load_file(os.path.join(server.loras_dir, e["outputs"]["5"]["text"][0].split("models/loras/")[-1]))
            for e in (out, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cancel_right_after_a_periodic_save_agrees_with_it(server):
    from safetensors.torch import load_file
    graph = trainer_graph(server.ckpt_name, iterations=100, seed=71, lora_name="draft/cancel_periodic",
                          save_every=2)
    before = trainer_run_id(server)
    with Running(server, graph):
        wait_status(server, lambda s: s.get("run") != before and
                    (s.get("saved") or "").endswith("step00002.safetensors"))
    final = server.get("/draft/status")["4"]
    n = final["iteration"]
    periodic = os.path.join(server.loras_dir, "draft", "cancel_periodic_step00002.safetensors")
    assert metadata(periodic)["draft_iteration"] == "2" and state_step(periodic) == 2
    partial = final["saved"]
    assert os.path.basename(partial) == f"cancel_periodic_step{n:05d}_partial.safetensors"
    assert metadata(partial)["draft_iteration"] == str(n) and state_step(partial) == n
    a, b = load_file(periodic), load_file(partial)
    same = all(torch.equal(a[k], b[k]) for k in a)
    assert same == (n == 2), n  # the same weights exactly when no update finished in between


# -- resume edge cases ------------------------------------------------------------------------------
def test_resume_without_side_file_continues_from_metadata_with_a_fresh_optimizer(server):
    first = trainer_graph(server.ckpt_name, iterations=3, seed=81, lora_name="draft/noside", save_every=3)
    server.run_prompt(first)
    lora = os.path.join(server.loras_dir, "draft", "noside_step00003.safetensors")
    os.remove(lora[: -len(".safetensors")] + ".draft_state")
    # a save killed mid-write left a hidden temporary file in that folder (its process is gone)
    dead = 999999
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
    leftover = os.path.join(server.loras_dir, "draft", f".noside_step00005.safetensors.draft-{dead}-0badf00d.tmp")
    with open(leftover, "wb") as f:
        f.write(b"half a file")
    log_start = len(server.log())
    graph = trainer_graph(server.ckpt_name, iterations=5, seed=81, lora_name="draft/noside_more", save_every=5)
    graph["4"]["inputs"]["resume_lora"] = "draft/noside_step00003.safetensors"
    entry = server.run_prompt(graph)
    st = server.get("/draft/status")["4"]
    assert st["iteration"] == 5 and len(st["rewards"]) == 5
    assert st["rewards"][:3] == [None, None, None] and all(r is not None for r in st["rewards"][3:])
    text = entry["outputs"]["4"]["text"][0]
    assert "without its .draft_state" in text and "from iteration 3" in text and "fresh optimizer" in text, text
    assert "fresh optimizer" in server.log()[log_start:]
    saved = os.path.join(server.loras_dir, "draft", "noside_more_step00005.safetensors")
    assert metadata(saved)["draft_iteration"] == "5" and state_step(saved) == 5
    assert not os.path.exists(leftover)


def test_resume_file_that_does_not_fit_the_settings_is_refused_before_training(server):
    server.run_prompt(trainer_graph(server.ckpt_name, iterations=2, seed=91, lora_name="draft/fit", save_every=2))
    name = "draft/fit_step00002.safetensors"

    def graph_with(node, **change):
        graph = trainer_graph(server.ckpt_name, iterations=4, seed=91, lora_name="draft/fit_more")
        graph["4"]["inputs"]["resume_lora"] = name
        graph[node]["inputs"].update(change)
        return graph

    # what the file itself says (step; rank and alpha against the trainer's defaults when no
    # LoRA Settings node is connected) is checked when the prompt is queued
    graph = graph_with("4", iterations=2)
    status, body = post_prompt(server, graph)
    assert status == 400, body
    problems = problem_lines(errors_by_node(body)["4"][0]["details"])
    assert list(problems) == ["iterations"] and "already holds 2 updates" in problems["iterations"], problems
    graph = graph_with("4")
    del graph["4"]["inputs"]["lora_settings"], graph[LORA_NODE]
    status, body = post_prompt(server, graph)
    assert status == 400, body
    problems = problem_lines(errors_by_node(body)["4"][0]["details"])
    assert list(problems) == ["resume_lora"], problems
    for expected in ("rank 4, alpha 4", "defaults (no DRaFT LoRA Settings node connected)", "lora_rank 8"):
        assert expected in problems["resume_lora"], problems
    # a connected LoRA Settings node's values: at the start of execute, naming the node
    cases = [({"lora_rank": 8}, ["rank 4", "DRaFT LoRA Settings (node 11) says lora_rank 8"]),
             ({"lora_alpha": 2.0}, ["alpha 4", "DRaFT LoRA Settings (node 11) says", "lora_alpha 2"])]
    for change, expected in cases:
        problems = problem_lines(run_expecting_refusal(server, graph_with(LORA_NODE, **change)))
        assert list(problems) == ["resume_lora"], problems
        assert all(f in problems["resume_lora"] for f in expected), problems
    # the file against the model's layers of the chosen target set: at the start of execute
    graph = graph_with(LORA_NODE, target_modules="kohya default")
    problems = problem_lines(run_expecting_refusal(server, graph))
    assert list(problems) == ["resume_lora"], problems
    assert "target_modules of DRaFT LoRA Settings (node 11) is 'kohya default'" in problems["resume_lora"], problems
