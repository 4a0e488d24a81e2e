"""A real ComfyUI server for tests: started on a free port with a temporary base directory.

The pack is linked into ``<base>/custom_nodes/ComfyUI-DRaFT`` and the tiny SD1.5 checkpoint into
``<base>/models/checkpoints`` (../shared/COMFYUI_NOTES.md section 9). Used by the ``comfyui`` and
``browser`` tests and by ``tools/demo.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".cache")
PACK_DIR_NAME = "ComfyUI-DRaFT"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(comfyui_path: str) -> str:
    """Path of the cached tiny SD1.5 checkpoint (generated on first use)."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    os.environ.setdefault("COMFYUI_PATH", comfyui_path)
    from tiny_checkpoint import cached_tiny_sd15
    return cached_tiny_sd15(CACHE)


def post_prompt(srv, graph):
    """(HTTP status, JSON body) of POST /prompt; NaN floats go out as JSON's NaN literal."""
    req = urllib.request.Request(srv.url + "/prompt",
                                 data=json.dumps({"prompt": graph, "client_id": srv.client_id}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class ComfyServer:
    """``with ComfyServer(comfyui_path) as srv: srv.run_prompt(api_graph)``."""

    def __init__(self, comfyui_path: str, checkpoint: str | None = None, base_dir: str | None = None,
                 extra_args=(), log_path: str | None = None):
        self.comfyui_path = comfyui_path
        self.checkpoint = checkpoint
        self.ckpt_name = os.path.basename(checkpoint) if checkpoint else None  # as a loader lists it
        self.port = free_port()
        self._own_base = base_dir is None
        self.base = base_dir or tempfile.mkdtemp(prefix="draft-comfy-")
        self.extra_args = list(extra_args)
        self.log_path = log_path or os.path.join(self.base, "server.log")
        self.proc = None
        self.client_id = uuid.uuid4().hex

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def loras_dir(self) -> str:
        return os.path.join(self.base, "models", "loras")

    def start(self, timeout: float = 120.0) -> None:
        os.makedirs(os.path.join(self.base, "custom_nodes"), exist_ok=True)
        os.makedirs(os.path.join(self.base, "models", "checkpoints"), exist_ok=True)
        os.makedirs(self.loras_dir, exist_ok=True)
        link = os.path.join(self.base, "custom_nodes", PACK_DIR_NAME)
        if not os.path.exists(link):
            os.symlink(REPO, link)
        if self.checkpoint:
            dst = os.path.join(self.base, "models", "checkpoints", os.path.basename(self.checkpoint))
            if not os.path.exists(dst):
                os.symlink(os.path.abspath(self.checkpoint), dst)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base, "--database-url", "sqlite:///:memory:",
               "--use-pytorch-cross-attention", "--disable-auto-launch", *self.extra_args]
        self._log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui_path, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during start-up:\n{self.log()[-4000:]}")
            try:
                info = self.get("/object_info/DRaFTTrainer")
                if "DRaFTTrainer" in info:
                    return
                raise RuntimeError(f"ComfyUI started without the DRaFT nodes:\n{self.log()[-4000:]}")
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not start in {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None):
            self._log.close()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    # -- HTTP -----------------------------------------------------------------------------------
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return json.loads(body) if body else {}
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from e

    def queue(self, api_graph: dict) -> str:
        return self.post("/prompt", {"prompt": api_graph, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The history entry of ``prompt_id`` once it has finished (success, error or interrupt)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error") or entry["status"]["messages"]:
                    return entry
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s\n{self.log()[-4000:]}")

    def run_prompt(self, api_graph: dict, timeout: float = 600.0) -> dict:
        entry = self.wait(self.queue(api_graph), timeout)
        if entry["status"]["status_str"] != "success":
            raise RuntimeError(f"prompt failed: {describe_failure(entry)}")
        return entry


def describe_failure(entry: dict) -> str:
    """The node, exception and the end of the traceback of a failed prompt's history entry."""
    for name, data in entry.get("status", {}).get("messages", []):
        if name == "execution_error":
            tb = "".join(data.get("traceback", []))[-3000:]
            return (f"{data.get('node_type')} (node {data.get('node_id')}): "
                    f"{data.get('exception_type')}: {data.get('exception_message')}\n{tb}")
    return json.dumps(entry.get("status"), indent=1)[-3000:]


def status_messages(entry: dict) -> list:
    """The event names in a history entry's status messages."""
    return [m[0] for m in entry.get("status", {}).get("messages", [])]
