"""Drive the ComfyUI frontend in the system Chromium (Playwright) for the browser tests and tools.

- ``browser()``: a headless Chromium (Playwright's own browser download is not needed).
- ``ComfyPage``: one ComfyUI tab; records console messages, waits for the app and our extension,
  loads workflows, reads node state, takes screenshots.
- ``render_templates(url, out_dir, update_thumbnails=False)``: loads every template in
  ``example_workflows/`` and screenshots it; with ``update_thumbnails=True`` it also writes the
  same-name ``.jpg`` thumbnail next to each template (what Browse Templates shows).

Command line (writes the thumbnails; needs COMFYUI_PATH and Chromium)::

    COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python tests/browser_helpers.py [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
EXAMPLES = os.path.join(REPO, "example_workflows")
DEFAULT_OUT = os.path.join(REPO, ".cache", "browser_out")
THUMB_SIZE = (640, 360)
THUMB_QUALITY = 80

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# User settings for a fresh test server: no first-run template browser, no minimap, canvas menu or
# render info over the screenshots, no "unsaved changes" prompt when the page reloads.
TEST_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasMenu": False,
    "Comfy.Window.UnloadConfirmation": False,
    "Comfy.Graph.CanvasInfo": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,  # full detail at every zoom (zoomed-out screenshots)
}

# Ours: the files under web/ are served from /extensions/<pack folder>/.
OUR_MARKERS = ("ComfyUI-DRaFT", "/extensions/ComfyUI-DRaFT/", "[DRaFT]", "draft_chart", "draft_text")


def chromium_executable() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@contextlib.contextmanager
def browser():
    """A headless system Chromium driven by Playwright."""
    from playwright.sync_api import sync_playwright
    exe = chromium_executable()
    if exe is None:
        raise RuntimeError("Chromium not found (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def configure_server(srv) -> None:
    """Settings a fresh ComfyUI user needs for a clean, dialog-free page."""
    srv.post("/settings", TEST_SETTINGS)


def template_paths() -> list:
    return sorted(glob.glob(os.path.join(EXAMPLES, "*.json")))


class ComfyPage:
    """One ComfyUI tab in ``browser_``; ``console`` holds every console message and page error."""

    def __init__(self, browser_, url: str, width: int = 1600, height: int = 1000):
        self.url = url
        self.context = browser_.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.console: list = []
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda e: self.console.append(
            {"type": "pageerror", "text": str(e), "url": "", "stack": e.stack or ""}))

    def _on_console(self, msg) -> None:
        loc = msg.location or {}
        self.console.append({"type": msg.type, "text": msg.text, "url": loc.get("url", ""), "stack": ""})

    def close(self) -> None:
        self.context.close()

    # -- loading --------------------------------------------------------------------------------
    def open(self, timeout: float = 90.0) -> "ComfyPage":
        self.page.goto(self.url)
        self.wait_ready(timeout)
        return self

    def reload(self, timeout: float = 90.0) -> None:
        self.page.reload()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """The app is set up, our nodes are registered and our extensions loaded."""
        self.page.wait_for_function(
            """() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph
                && window.LiteGraph.registered_node_types['DRaFTTrainer']
                && window.app.extensions?.some?.(e => e.name === 'DRaFT.RewardChart')
                && window.app.vueAppReady)""", timeout=timeout * 1000)

    def evaluate(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def client_id(self) -> str:
        return self.evaluate("() => window.comfyAPI.api.api.clientId")

    # -- console --------------------------------------------------------------------------------
    def errors(self) -> list:
        return [m for m in self.console if m["type"] in ("error", "pageerror")]

    def our_problems(self) -> list:
        """Errors and warnings that come from our extension's files or mention DRaFT."""
        out = []
        for m in self.console:
            if m["type"] not in ("error", "pageerror", "warning"):
                continue
            blob = " ".join((m["text"], m["url"], m["stack"]))
            if any(k in blob for k in OUR_MARKERS) or "draft." in m["text"].lower():
                out.append(m)
        return out

    # -- workflows ------------------------------------------------------------------------------
    def load_workflow(self, data: dict, name: str = "workflow") -> dict:
        """``app.loadGraphData`` (as opening a file does); returns the node types the frontend
        does not know and whether the missing-nodes dialog showed."""
        result = self.evaluate(
            """async ([data, name]) => {
                await app.loadGraphData(data, true, true, name,
                                        {showMissingNodesDialog: true, showMissingModelsDialog: false});
                const known = LiteGraph.registered_node_types;
                const types = (data.nodes || []).map(n => n.type);
                for (const sg of (data.definitions?.subgraphs || []))
                    for (const n of (sg.nodes || [])) types.push(n.type);
                const sgIds = new Set((data.definitions?.subgraphs || []).map(s => s.id));
                return {
                    missing: [...new Set(types.filter(t => !known[t] && !sgIds.has(t)))],
                    graphTypes: app.graph.nodes.map(n => n.type),
                    count: app.graph.nodes.length,
                };
            }""", [data, name])
        self.page.wait_for_timeout(300)
        result["missing_dialog"] = self.missing_nodes_dialog_visible()
        return result

    def load_api_graph(self, api_graph: dict, name: str = "api_graph") -> None:
        """``app.loadApiJson``: UI nodes whose ids are the API graph's ids."""
        self.evaluate("([g, name]) => app.loadApiJson(g, name)", [api_graph, name])
        self.page.wait_for_timeout(200)

    def missing_nodes_dialog_visible(self) -> bool:
        return self.evaluate("""() => [...document.querySelectorAll('.comfy-missing-nodes')]
                                  .some(e => e.offsetParent !== null)""")

    def dialogs(self) -> list:
        """Text of the visible dialogs (error reports, warnings)."""
        return self.evaluate("""() => [...document.querySelectorAll('.p-dialog')]
                                  .filter(e => e.offsetParent !== null).map(e => e.innerText)""")

    def close_dialogs(self) -> None:
        for _ in range(3):
            if not self.dialogs():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(200)

    # -- nodes ----------------------------------------------------------------------------------
    def chart(self, node_id) -> dict | None:
        """What the trainer node ``node_id`` shows (node.draftChart), or None without a chart."""
        return self.evaluate(
            """(id) => {
                const n = app.graph.getNodeById(id);
                const c = n && n.draftChart;
                if (!c) return null;
                return {run: c.run, status: c.status, rewards: c.rewards, ma: c.ma,
                        iteration: c.iteration, total: c.total, skipped: c.skipped,
                        saved: c.saved, restored: c.restored, live: c.live, lines: c.lines,
                        text: c.text, heldout: c.heldout, stopReason: c.stopReason};
            }""", node_id)

    def widget_value(self, node_id, name: str):
        return self.evaluate("""([id, name]) => {
            const w = app.graph.getNodeById(id)?.widgets?.find(w => w.name === name);
            return w ? w.value : null }""", [node_id, name])

    # -- view and screenshots -------------------------------------------------------------------
    def fit_view(self, node_ids=None, zoom: float = 0.9) -> None:
        """Fit the view around all nodes (or ``node_ids``), without animation."""
        self.evaluate("""([ids, zoom]) => {
            const nodes = ids ? ids.map(i => app.graph.getNodeById(i)) : app.graph.nodes;
            let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
            for (const n of nodes) {
                const b = n.boundingRect;
                x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
                x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
            }
            app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], {zoom});
            app.canvas.setDirty(true, true);
        }""", [node_ids, zoom])
        self.settle()

    def show_node(self, node_id, scale: float = 1.0, margin: int = 24) -> dict:
        """Put node ``node_id`` at the canvas' top-left at ``scale``; returns its screen rect."""
        rect = self.evaluate("""([id, scale, margin]) => {
            const n = app.graph.getNodeById(id);
            const b = n.boundingRect;
            app.canvas.deselectAll?.();
            app.canvas.ds.scale = scale;
            app.canvas.ds.offset[0] = -b[0] + margin / scale;
            app.canvas.ds.offset[1] = -b[1] + margin / scale;
            app.canvas.setDirty(true, true);
            const c = app.canvas.canvas.getBoundingClientRect();
            return {x: c.left + margin, y: c.top + margin, width: b[2] * scale, height: b[3] * scale};
        }""", [node_id, scale, margin])
        self.settle()
        return rect

    def screenshot_node(self, node_id, path: str, scale: float = 1.0, pad: int = 8,
                        hide_links: bool = True) -> dict:
        """A picture of one node and its badge (the viewport grows to fit it), moved away from the
        other nodes for the shot; links hidden unless asked."""
        height = self.evaluate("(id) => app.graph.getNodeById(id).boundingRect[3]", node_id)
        vp = self.page.viewport_size
        need = int(height * scale + 200)
        if vp["height"] < need:
            self.page.set_viewport_size({"width": vp["width"], "height": need})
        saved = self.evaluate("""([id, hide]) => { const n = app.graph.getNodeById(id);
            const state = {mode: app.canvas.links_render_mode, pos: [...n.pos]};
            if (hide) app.canvas.links_render_mode = LiteGraph.HIDDEN_LINK ?? -1;
            n.pos[0] += 100000;  // nothing else in the picture
            return state }""", [node_id, hide_links])
        self.focus_mode(True)
        badge = 26  # the node-source badge sits above the title bar
        try:
            rect = self.show_node(node_id, scale=scale, margin=pad + badge + 8)
            clip = {"x": rect["x"] - pad, "y": rect["y"] - pad - badge * scale,
                    "width": rect["width"] + 2 * pad, "height": rect["height"] + 2 * pad + badge * scale}
            self.screenshot(path, clip=clip)
        finally:
            self.evaluate("""([id, s]) => { const n = app.graph.getNodeById(id);
                app.canvas.links_render_mode = s.mode; n.pos[0] = s.pos[0]; n.pos[1] = s.pos[1];
                app.canvas.setDirty(true, true) }""", [node_id, saved])
            self.focus_mode(False)
            if vp["height"] < need:
                self.page.set_viewport_size(vp)
        return clip

    def focus_mode(self, on: bool = True) -> None:
        """Hide the menus, tabs and side bars (ComfyUI's focus mode) for clean screenshots."""
        self.evaluate("""async (on) => {
            const settings = app.extensionManager.setting;
            if (on) {
                window.__draftTabs ??= settings.get('Comfy.Workflow.WorkflowTabsPosition');
                await settings.set('Comfy.Workflow.WorkflowTabsPosition', 'Sidebar');
            } else if (window.__draftTabs) {
                await settings.set('Comfy.Workflow.WorkflowTabsPosition', window.__draftTabs);
                window.__draftTabs = undefined;
            }
            app.extensionManager.focusMode = on;
            document.getElementById('draft-screenshot-style')?.remove();
            if (on) {  // focus mode's own "show menu" button
                const style = document.createElement('style');
                style.id = 'draft-screenshot-style';
                style.textContent = '.comfy-menu-hamburger { visibility: hidden !important; }';
                document.head.appendChild(style);
            }
        }""", on)
        self.settle()

    def settle(self, ms: int = 400) -> None:
        """Let the canvas and the DOM widgets redraw."""
        self.page.wait_for_timeout(ms)
        self.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def canvas_rect(self) -> dict:
        return self.evaluate("""() => { const r = app.canvas.canvas.getBoundingClientRect();
                                        return {x: r.left, y: r.top, width: r.width, height: r.height} }""")

    def screenshot(self, path: str, clip: dict | None = None) -> bytes:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        clip = clip or self.canvas_rect()
        return self.page.screenshot(path=path, clip=clip)


def write_thumbnail(png: bytes, path: str, size=THUMB_SIZE, quality: int = THUMB_QUALITY) -> None:
    """A ``size`` JPEG of a screenshot: scaled to cover, centre-cropped."""
    from PIL import Image
    im = Image.open(io.BytesIO(png)).convert("RGB")
    scale = max(size[0] / im.width, size[1] / im.height)
    im = im.resize((max(size[0], round(im.width * scale)), max(size[1], round(im.height * scale))),
                   Image.LANCZOS)
    left, top = (im.width - size[0]) // 2, (im.height - size[1]) // 2
    im.crop((left, top, left + size[0], top + size[1])).save(path, "JPEG", quality=quality, optimize=True)


def render_template(cpage: ComfyPage, path: str, out_dir: str, update_thumbnails: bool = False) -> dict:
    """Load one template, screenshot it into ``out_dir``; optionally write its thumbnail."""
    with open(path) as f:
        data = json.load(f)
    name = os.path.splitext(os.path.basename(path))[0]
    result = cpage.load_workflow(data, name)
    result["dialogs"] = cpage.dialogs()
    cpage.close_dialogs()
    cpage.fit_view(zoom=0.95)
    png = cpage.screenshot(os.path.join(out_dir, name + ".png"))
    result["screenshot"] = os.path.join(out_dir, name + ".png")
    if update_thumbnails:
        thumb = os.path.splitext(path)[0] + ".jpg"
        write_thumbnail(png, thumb)
        result["thumbnail"] = thumb
    result["name"] = name
    return result


def render_templates(url: str, out_dir: str = DEFAULT_OUT, update_thumbnails: bool = False,
                     paths=None, browser_=None) -> list:
    """Every template (or ``paths``) loaded on the ComfyUI at ``url``: one result per file."""
    paths = template_paths() if paths is None else list(paths)
    with contextlib.ExitStack() as stack:
        b = browser_ or stack.enter_context(browser())
        # 1280x720 viewport: 16:9 like the thumbnails.
        cpage = ComfyPage(b, url, width=1280 + 0, height=720 + 0)
        stack.callback(cpage.close)
        cpage.open()
        cpage.focus_mode(True)
        return [render_template(cpage, p, out_dir, update_thumbnails) for p in paths]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot every example workflow and write its "
                                                 "thumbnail (example_workflows/<name>.jpg).")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where the full screenshots go")
    parser.add_argument("--no-thumbnails", action="store_true", help="screenshots only")
    args = parser.parse_args(argv)
    sys.path.insert(0, HERE)
    from comfy_server import ComfyServer
    from conftest import comfyui_path
    comfy = comfyui_path()
    if comfy is None:
        print("set COMFYUI_PATH to a ComfyUI checkout", file=sys.stderr)
        return 2
    if not template_paths():
        print(f"no templates in {EXAMPLES}", file=sys.stderr)
        return 1
    t0 = time.time()
    with ComfyServer(comfy) as srv:
        configure_server(srv)
        results = render_templates(srv.url, args.out, update_thumbnails=not args.no_thumbnails)
    bad = 0
    for r in results:
        problem = r["missing"] or r["missing_dialog"]
        bad += bool(problem)
        print(f"{r['name']}: {r['count']} nodes, screenshot {r['screenshot']}"
              + (f", thumbnail {r['thumbnail']}" if r.get("thumbnail") else "")
              + (f"  MISSING NODES {r['missing']}" if problem else ""))
    print(f"{len(results)} templates in {time.time() - t0:.0f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
