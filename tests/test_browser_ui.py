"""The frontend extension (web/) in a real ComfyUI page, driven by Playwright in the system Chromium.

Marker ``browser`` (and ``comfyui``): skipped without COMFYUI_PATH or Chromium. One ComfyUI server
and one browser serve the whole module; training runs on the tiny random SD1.5 checkpoint at 64x64.

Screenshots go to $DRAFT_BROWSER_OUT (default .cache/browser_out/), the trainer node with its chart
included. The README's copies, docs/draft_trainer_chart.png and docs/heldout_chart.png (the chart
with the held-out check's curves), are written when missing or with
DRAFT_UPDATE_ASSETS=1, which also rewrites the example_workflows/*.jpg thumbnails (as does
``python tests/browser_helpers.py``); so a plain test run leaves the committed files alone.
"""
import json
import math
import os
import shutil
import sys
import time

import pytest

from conftest import comfyui_path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tools"))

import browser_helpers as bh  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.comfyui]

OUT = os.environ.get("DRAFT_BROWSER_OUT", bh.DEFAULT_OUT)
DOCS_SHOT = os.path.join(REPO, "docs", "draft_trainer_chart.png")
HELDOUT_DOCS_SHOT = os.path.join(REPO, "docs", "heldout_chart.png")
UPDATE_ASSETS = os.environ.get("DRAFT_UPDATE_ASSETS", "") not in ("", "0")
TEMPLATES = bh.template_paths()
OUR_NODES = {"DRaFTTrainer", "DRaFTSampler", "DRaFTSaveLoRA", "DRaFTEvaluate", "DRaFTImageStatReward",
             "DRaFTCombineRewards", "DRaFTLoRASettings", "DRaFTOptimizer", "DRaFTSavePreview"}
MAX_TRAINER_WIDGETS = 16  # issue 23: a trainer a newcomer reads at a glance
# The trainer's optional settings nodes: its input -> the node feeding it.
TRAINER_OPTIONS = {"lora_settings": "DRaFTLoRASettings", "optimizer": "DRaFTOptimizer",
                   "saving": "DRaFTSavePreview", "memory": "DRaFTMemoryOptions", "guidance": "DRaFTGuidance",
                   "video": "DRaFTVideoSettings", "experts": "DRaFTWan22Experts"}
SETTINGS_WIDGETS = """(n) => n.widgets.filter(w => !w.name.startsWith('draft_')).map(w => w.name)"""


@pytest.fixture(scope="module")
def server():
    from comfy_server import ComfyServer, tiny_checkpoint
    path = comfyui_path()
    ckpt = tiny_checkpoint(path)
    # One torch thread for the server, the other core for Chromium: on 2 cores, torch's OpenMP
    # threads competing with the browser (or anything else) slow training down many times over.
    saved = os.environ.get("OMP_NUM_THREADS")
    srv = ComfyServer(path, checkpoint=ckpt)
    try:
        os.environ["OMP_NUM_THREADS"] = saved or "1"
        try:
            srv.start()
        finally:
            if saved is None:
                del os.environ["OMP_NUM_THREADS"]
        srv.object_info = srv.get("/object_info")
        bh.configure_server(srv)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def chrome():
    with bh.browser() as b:
        yield b


@pytest.fixture(scope="module")
def cpage(server, chrome):
    p = bh.ComfyPage(chrome, server.url).open()
    yield p
    p.close()


@pytest.fixture(scope="module")
def tpage(server, chrome):
    """A 16:9 page (the thumbnails' aspect ratio) in focus mode, for the templates."""
    p = bh.ComfyPage(chrome, server.url, width=1280, height=720).open()
    p.focus_mode(True)
    yield p
    p.close()


def assert_no_problems_from_us(cpage):
    problems = cpage.our_problems()
    assert not problems, json.dumps(problems, indent=1)[:4000]


def wait_for(fn, timeout, what, interval=0.25):
    deadline = time.time() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def moving_average(values, window=10):
    out, buf = [], []
    for v in values:
        if v is not None and math.isfinite(v):
            buf.append(v)
        buf = buf[-window:]
        out.append(sum(buf) / len(buf) if buf else None)
    return out


# ---------------------------------------------------------------------------------------------
def test_extension_loads_and_our_nodes_are_in_the_node_search(server, cpage):
    served = server.get("/extensions")
    assert "/extensions/ComfyUI-DRaFT/draft_chart.js" in served, served
    assert "/extensions/ComfyUI-DRaFT/draft_text.js" in served, served
    names = cpage.evaluate("() => app.extensions.map(e => e.name)")
    assert {"DRaFT.RewardChart", "DRaFT.OutputText"} <= set(names)

    page = cpage.page
    cpage.evaluate("() => app.graph.clear()")
    cpage.settle()
    rect = cpage.canvas_rect()
    box = page.locator(".comfy-vue-node-search-container input").first
    for attempt in range(3):  # a double-click on an empty spot of the canvas opens the search box
        page.mouse.dblclick(rect["x"] + rect["width"] * (0.5 + 0.05 * attempt), rect["y"] + rect["height"] * 0.4)
        try:
            box.wait_for(state="visible", timeout=8000)
            break
        except Exception:
            if attempt == 2:
                raise
    box.fill("DRaFT")
    options = page.locator(".comfy-vue-node-search-container li[role=option]")
    page.wait_for_function(
        """() => [...document.querySelectorAll('.comfy-vue-node-search-container li[role=option]')]
                 .some(li => li.innerText.includes('DRaFT Trainer'))""", timeout=30000)
    found = options.all_inner_texts()
    expected = {server.object_info[n]["display_name"] for n in OUR_NODES}
    missing = {name for name in expected if not any(name in text for text in found)}
    assert not missing, (missing, found)

    # Pick the trainer: a node with the chart widget appears, empty, and draws without errors.
    options.filter(has_text="DRaFT Trainer").first.click()
    node = wait_for(lambda: cpage.evaluate(
        """() => { const n = app.graph.nodes.find(n => n.type === 'DRaFTTrainer');
                   return n && {id: n.id, widgets: n.widgets.map(w => w.name),
                                hasChart: !!n.draftChart, size: n.size} }"""), 10, "the trainer node")
    assert node["hasChart"] and node["widgets"][-1] == "draft_reward_chart", node
    cpage.settle()
    chart = cpage.chart(node["id"])
    assert chart["rewards"] == [] and chart["run"] is None, chart
    assert_no_problems_from_us(cpage)


def test_several_trainers_without_a_run_draw_cleanly_and_serialize_only_schema_widgets(server, cpage):
    created = cpage.evaluate("""() => {
        app.graph.clear();
        const ids = [];
        for (const [type, x, y] of [['DRaFTTrainer', 50, 50], ['DRaFTTrainer', 520, 50],
                                    ['DRaFTEvaluate', 990, 50], ['DRaFTSaveLoRA', 990, 400]]) {
            const n = LiteGraph.createNode(type);
            n.pos = [x, y];
            app.graph.add(n);
            ids.push(n.id);
        }
        app.canvas.setDirty(true, true);
        return ids;
    }""")
    cpage.fit_view()
    cpage.evaluate("() => app.canvas.draw(true, true)")
    for node_id in created[:2]:
        chart = cpage.chart(node_id)
        assert chart is not None and chart["rewards"] == [], chart
    for node_id in created[2:]:
        assert cpage.widget_value(node_id, "draft_output") == ""

    # The chart and the text boxes are neither saved in the workflow nor sent in the prompt.
    workflow = cpage.evaluate("() => app.graph.serialize()")
    prompt = cpage.evaluate("async () => (await app.graphToPrompt()).output")
    from workflow_api import widget_names
    for n in workflow["nodes"]:
        expected = sum(2 if control else 1 for _, control in widget_names(server.object_info[n["type"]]))
        assert len(n["widgets_values"]) == expected, (n["type"], n["widgets_values"])
    for entry in prompt.values():
        assert not {"draft_reward_chart", "draft_output"} & set(entry["inputs"]), entry
    cpage.screenshot(os.path.join(OUT, "empty_nodes.png"))
    assert_no_problems_from_us(cpage)


def test_trainer_shows_at_most_16_widgets_and_takes_the_rest_from_optional_nodes(server, cpage):
    """The real frontend's trainer: its settings widgets (the chart, ``draft_reward_chart``, is
    ours and shows no setting) are the schema's, at most 16; each optional settings node connects
    to its input, and the prompt the frontend sends carries the links."""
    from workflow_api import widget_names
    made = cpage.evaluate("""([options, settings]) => {
        app.graph.clear();
        const trainer = LiteGraph.createNode('DRaFTTrainer');
        trainer.pos = [500, 50];
        app.graph.add(trainer);
        const linked = {};
        Object.entries(options).forEach(([input, type], i) => {
            const n = LiteGraph.createNode(type);
            n.pos = [50, 50 + 210 * i];
            app.graph.add(n);
            n.connect(0, trainer, trainer.findInputSlot(input));
            linked[input] = trainer.inputs[trainer.findInputSlot(input)].link !== null;
        });
        app.canvas.setDirty(true, true);
        return {id: trainer.id, widgets: eval(settings)(trainer),
                all: trainer.widgets.map(w => w.name), linked};
    }""", [TRAINER_OPTIONS, SETTINGS_WIDGETS])
    print(f"DRaFT Trainer in the frontend: {len(made['widgets'])} settings widgets "
          f"({len(made['all'])} with the chart): {made['widgets']}")
    assert len(made["widgets"]) <= MAX_TRAINER_WIDGETS, made
    assert made["widgets"] == [n for n, _ in widget_names(server.object_info["DRaFTTrainer"])], made
    assert set(made["all"]) - set(made["widgets"]) == {"draft_reward_chart"}, made
    assert made["linked"] == {name: True for name in TRAINER_OPTIONS}, made
    prompt = cpage.evaluate("async () => (await app.graphToPrompt()).output")
    inputs = prompt[str(made["id"])]["inputs"]
    for name, node_type in TRAINER_OPTIONS.items():
        source = inputs[name][0]
        assert prompt[str(source)]["class_type"] == node_type, (name, prompt)
    cpage.fit_view()
    cpage.screenshot(os.path.join(OUT, "trainer_with_options.png"))
    assert_no_problems_from_us(cpage)


def send(cpage, event, detail):
    """Deliver a websocket-style event to the page's api object (as the server's would arrive)."""
    cpage.evaluate("([t, d]) => window.comfyAPI.api.api.dispatchCustomEvent(t, d)", [event, detail])


def test_chart_follows_events_skips_new_runs_and_long_runs(server, cpage):
    cpage.load_api_graph({"101": {"class_type": "DRaFTTrainer", "inputs": {}},
                          "102": {"class_type": "DRaFTTrainer", "inputs": {}}}, "synthetic")
    send(cpage, "draft.started", {"node": "101", "run": "r1", "total": 40, "rewards": []})
    rewards = [0.5, 0.52, None, 0.55, 0.51, 0.6]
    for i, r in enumerate(rewards, 1):
        send(cpage, "draft.progress", {
            "node": "101", "run": "r1", "iteration": i, "total": 40, "reward": r, "reward_ma": None,
            "skipped": sum(v is None for v in rewards[:i]), "sec_per_iter": 2.5, "eta_s": 2.5 * (40 - i),
            "saved": None, "status": "running"})
    send(cpage, "draft.progress", {"node": "102", "run": "other", "iteration": 1, "total": 5,
                                   "reward": 9.0, "reward_ma": 9.0, "skipped": 0, "sec_per_iter": 1.0,
                                   "eta_s": 4.0, "saved": None, "status": "running"})
    chart = cpage.chart(101)
    assert chart["rewards"] == rewards and chart["run"] == "r1" and chart["skipped"] == 1, chart
    assert chart["ma"] == pytest.approx(moving_average(rewards)), chart["ma"]
    assert chart["lines"][0] == "iteration 6 / 40  ·  2.50 s/it  ·  1m 25s left", chart["lines"]
    assert "skipped (NaN) 1" in chart["lines"][1]
    assert cpage.chart(102)["rewards"] == [9.0]
    cpage.screenshot_node(101, os.path.join(OUT, "synthetic_skips.png"))

    # Cancel: the partial LoRA's path shows, relative to models/loras.
    send(cpage, "draft.finished", {"node": "101", "run": "r1", "status": "interrupted",
                                   "saved": "/x/models/loras/draft/t_step00006_partial.safetensors"})
    chart = cpage.chart(101)
    assert chart["status"] == "interrupted" and "interrupted" in chart["lines"][0]
    assert chart["lines"][2] == "saved: models/loras/draft/t_step00006_partial.safetensors"

    # A new run clears the chart; a resumed run starts from its history.
    send(cpage, "draft.started", {"node": "101", "run": "r2", "total": 10, "rewards": []})
    assert cpage.chart(101)["rewards"] == [] and cpage.chart(101)["run"] == "r2"
    history = [math.sin(i / 300.0) + 0.1 * ((i * 7919) % 13) / 13 for i in range(20000)]
    history[500] = None
    send(cpage, "draft.started", {"node": "101", "run": "r3", "total": 30000, "rewards": history})
    chart = cpage.chart(101)
    assert chart["rewards"] == history and chart["iteration"] == 20000
    ms = cpage.evaluate("""() => { const t = performance.now();
        for (let i = 0; i < 10; i++) app.canvas.draw(true, true);
        return (performance.now() - t) / 10 }""")
    assert ms < 100, f"{ms:.1f} ms per frame with a 20000-point chart"
    cpage.fit_view([101])
    cpage.screenshot(os.path.join(OUT, "synthetic_long_run.png"))

    # A run first seen mid-way (page opened late): the missing points are fetched, not invented.
    send(cpage, "draft.progress", {"node": "102", "run": "late", "iteration": 4, "total": 5,
                                   "reward": 1.0, "reward_ma": 1.0, "skipped": 0, "sec_per_iter": 1.0,
                                   "eta_s": 1.0, "saved": None, "status": "running"})
    assert cpage.chart(102)["rewards"] == [None, None, None, 1.0]
    assert cpage.chart(102)["skipped"] == 0

    # A trainer inside a subgraph: the server reports its execution id "<subgraph node>:<node>".
    ids = cpage.evaluate("""() => {
        const {subgraph, node} = app.graph.convertToSubgraph(new Set([app.graph.getNodeById(102)]));
        return [node.id, subgraph.nodes.find(n => n.type === 'DRaFTTrainer').id] }""")
    send(cpage, "draft.started", {"node": f"{ids[0]}:{ids[1]}", "run": "sub", "total": 3, "rewards": [0.25]})
    inner = cpage.evaluate("""([outer, id]) => { const c = app.graph.getNodeById(outer).subgraph
        .getNodeById(id).draftChart; return {key: c.key, rewards: c.rewards} }""", ids)
    assert inner == {"key": f"{ids[0]}:{ids[1]}", "rewards": [0.25]}, inner
    assert_no_problems_from_us(cpage)


# The held-out check's figures as the server sends them (nodes/progress_events.py, draft.heldout).
HELDOUT_SERIES = [{"key": "judge1", "label": "PickScore", "kind": "judge"},
                  {"key": "judge2", "label": "HPSv2", "kind": "judge"},
                  {"key": "reward", "label": "training reward (aesthetic)", "kind": "reward"},
                  {"key": "similarity", "label": "similarity across seeds (pixels)", "kind": "similarity"}]
HELDOUT_COLORS = {"judge1": (0x4b, 0xe3, 0x8a), "judge2": (0xc1, 0x8c, 0xff),
                  "reward": (0x2a, 0xd4, 0xd4), "similarity": (0xe8, 0xd8, 0x4a)}
# Update -> figures: PickScore peaks at 20 and falls to its minimum at 50; HPSv2 peaks at 30; the
# held-out training reward and the similarity keep rising (maximum at 50, minimum at 0).
HELDOUT_FIGURES = {
    0: {"judge1": 0.200, "judge2": 0.250, "reward": 5.00, "similarity": 0.30},
    10: {"judge1": 0.212, "judge2": 0.260, "reward": 5.20, "similarity": 0.32},
    20: {"judge1": 0.221, "judge2": 0.270, "reward": 5.35, "similarity": 0.36},
    30: {"judge1": 0.214, "judge2": 0.275, "reward": 5.50, "similarity": 0.41},
    40: {"judge1": 0.208, "judge2": 0.270, "reward": 5.60, "similarity": 0.47},
    50: {"judge1": 0.196, "judge2": 0.265, "reward": 5.70, "similarity": 0.52},
}
STOP_REASON = "judge PickScore fell for 3 evaluations after update 20; kept update 20"

# Draws node `id`'s chart widget into an offscreen canvas (as LiteGraph draws it, at y = 0) and
# counts, inside the plot (the legend and footer excluded), the pixels near each colour given;
# `boxes`: [name, update, fraction of the plot height from the bottom, colour] -> count in a 9x9 box.
DRAW_AND_COUNT = """([id, colors, boxes]) => {
    const n = app.graph.getNodeById(id);
    const w = n.widgets.find(w => w.name === 'draft_reward_chart');
    const W = Math.round(n.size[0]), H = Math.round((w.computedHeight ?? w.computeLayoutSize(n).minHeight) + 8);
    const canvas = document.createElement('canvas');
    canvas.width = W; canvas.height = H;
    const ctx = canvas.getContext('2d');
    ctx.fillStyle = '#353535'; ctx.fillRect(0, 0, W, H);
    w.draw(ctx, n, W, 0, H, false);
    const L = n.draftChart.layout, p = L.plot;
    const near = (d, i, c) => Math.max(Math.abs(d[i] - c[0]), Math.abs(d[i + 1] - c[1]), Math.abs(d[i + 2] - c[2])) <= 24;
    const count = (x, y, w, h, c) => {
        const d = ctx.getImageData(Math.round(x), Math.round(y), Math.max(1, Math.round(w)), Math.max(1, Math.round(h))).data;
        let k = 0;
        for (let i = 0; i < d.length; i += 4) if (near(d, i, c)) k++;
        return k;
    };
    const plot = {};
    for (const [name, c] of Object.entries(colors)) plot[name] = count(p.l, p.t, p.r - p.l, p.b - p.t, c);
    const box = {};
    for (const [name, u, f, c] of boxes) {
        const x = L.x_of(u), y = p.b - (p.b - p.t) * f;
        box[name] = count(x - 4, y - 4, 9, 9, c);
    }
    let bestColumn = null;
    if (L.best_x !== null) bestColumn = count(L.best_x - 1, p.t, 2, p.b - p.t, colors.judge1) / 2 / (p.b - p.t);
    return {plot, box, bestColumn, best_x: L.best_x, x: [0, 1, 50, 60].map(u => L.x_of(u)),
            rect: [p.l, p.t, p.r, p.b], legend: L.legend, W, H, png: canvas.toDataURL('image/png')};
}"""


def heldout_pixels(cpage, node_id, name):
    """DRAW_AND_COUNT's counts; the offscreen picture is saved as OUT/<name>.png."""
    boxes = [["judge1_min_at_50", 50, 0.07, HELDOUT_COLORS["judge1"]],
             ["similarity_max_at_50", 50, 0.93, HELDOUT_COLORS["similarity"]],
             ["similarity_min_at_0", 0, 0.07, HELDOUT_COLORS["similarity"]],
             ["judge2_max_at_30", 30, 0.93, HELDOUT_COLORS["judge2"]]]
    result = cpage.evaluate(DRAW_AND_COUNT, [node_id, HELDOUT_COLORS, boxes])
    import base64
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, name + ".png"), "wb") as f:
        f.write(base64.b64decode(result.pop("png").split(",", 1)[1]))
    return result


def color_counts(png_path, rect, colors, tol=24):
    """Pixels of each colour in ``rect`` (x0, y0, x1, y1) of a screenshot."""
    from PIL import Image
    im = Image.open(png_path).convert("RGB").crop(tuple(int(round(v)) for v in rect))
    out = {}
    for name, c in colors.items():
        out[name] = sum(1 for px in im.getdata() if max(abs(px[k] - c[k]) for k in range(3)) <= tol)
    return out


def test_chart_draws_the_heldout_check_and_redraws_it_after_a_reload(server, cpage):
    """draft.heldout events: the figures are held per run, drawn as dashed curves over the update
    axis (each scaled to its own range, update 0 left of update 1) with the best marker, and the
    stop reason of draft.finished shows in the info lines; a reloaded page gets them back from
    /draft/status (served here by the test: only a real run with the check fills the server's)."""
    cpage.load_api_graph({"101": {"class_type": "DRaFTTrainer", "inputs": {}}}, "heldout")
    cpage.evaluate("""() => { const n = app.graph.getNodeById(101); n.setSize([480, n.size[1]]) }""")
    total, rewards = 60, [5.0 + 0.02 * i + 0.05 * math.sin(i) for i in range(1, 51)]

    def progress(i):
        send(cpage, "draft.progress", {
            "node": "101", "run": "h1", "iteration": i, "total": total, "reward": rewards[i - 1],
            "reward_ma": None, "skipped": 0, "sec_per_iter": 1.5, "eta_s": 1.5 * (total - i),
            "saved": None, "status": "running"})

    def heldout(u, best):
        send(cpage, "draft.heldout", {"node": "101", "run": "h1", "iteration": u,
                                      "figures": HELDOUT_FIGURES[u], "series": HELDOUT_SERIES,
                                      "ranking": "judge1", "best_iteration": best, "stop_reason": ""})

    send(cpage, "draft.started", {"node": "101", "run": "h1", "total": total, "rewards": []})
    for i in range(1, 11):
        progress(i)
    # Negative control: a run without held-out data draws none of the held-out colours.
    assert cpage.chart(101)["heldout"] is None
    before = heldout_pixels(cpage, 101, "heldout_offscreen_before")
    assert before["plot"] == dict.fromkeys(HELDOUT_COLORS, 0), before
    assert before["best_x"] is None, before

    best = None
    for u in range(0, 51, 10):
        if u:
            for i in range(u - 9, u + 1):
                if i > 10:
                    progress(i)
        if best is None or HELDOUT_FIGURES[u]["judge1"] > HELDOUT_FIGURES[best]["judge1"]:
            best = u
        heldout(u, best)
    chart = cpage.chart(101)
    held = chart["heldout"]
    assert held["series"] == HELDOUT_SERIES and held["ranking"] == "judge1", held
    assert held["evaluations"] == [{"iteration": u, "figures": f} for u, f in HELDOUT_FIGURES.items()]
    assert held["best_iteration"] == 20 and held["stop_reason"] == "", held
    assert not any(line.startswith("stopped:") for line in chart["lines"]), chart["lines"]

    send(cpage, "draft.finished", {"node": "101", "run": "h1", "status": "finished", "saved": None,
                                   "stop_reason": STOP_REASON})
    chart = cpage.chart(101)
    assert chart["stopReason"] == STOP_REASON and chart["heldout"]["stop_reason"] == STOP_REASON
    assert f"stopped: {STOP_REASON}" in chart["lines"], chart["lines"]
    assert chart["lines"][0].startswith("iteration 50 / 60  ·  finished"), chart["lines"]

    # Drawn: every series' colour in the plot, each at its own scale where its figures say.
    drawn = heldout_pixels(cpage, 101, "heldout_offscreen")
    print("held-out pixels:", drawn)
    for key, count in drawn["plot"].items():
        assert count >= 40, (key, drawn)
    assert drawn["box"]["judge1_min_at_50"] >= 8, drawn  # PickScore's minimum, at the bottom
    assert drawn["box"]["similarity_max_at_50"] >= 8, drawn  # similarity's maximum, at the top
    assert drawn["box"]["similarity_min_at_0"] >= 8, drawn  # update 0: the base model
    assert drawn["box"]["judge2_max_at_30"] >= 8, drawn
    x0, x1, x50, x60 = drawn["x"]
    plot_l, _, plot_r, _ = drawn["rect"]
    assert plot_l < x0 < x1 < x50 < x60 <= plot_r, drawn  # update 0 one slot left of update 1
    assert x1 - x0 == pytest.approx((x60 - x0) / 60, rel=1e-6), drawn
    # The best marker: a full-height line at update 20 in the ranking judge's colour.
    assert drawn["best_x"] == round(cpage.evaluate(
        "() => app.graph.getNodeById(101).draftChart.layout.x_of(20)")), drawn
    assert drawn["bestColumn"] > 0.8, drawn

    # On the real canvas: a picture of the node, the held-out colours inside its plot.
    shot = os.path.join(OUT, "heldout_chart.png")
    cpage.evaluate("() => { const n = app.graph.getNodeById(101); n.setSize([480, n.size[1] + 90]) }")
    clip = cpage.screenshot_node(101, shot)
    geo = cpage.evaluate("""() => { const n = app.graph.getNodeById(101);
        const w = n.widgets.find(w => w.name === 'draft_reward_chart');
        return {dx: n.pos[0] - n.boundingRect[0], dy: n.pos[1] - n.boundingRect[1], chart_y: w.y,
                plot: n.draftChart.layout.plot, legend: n.draftChart.layout.legend} }""")
    badge, pad = 26, 8  # as screenshot_node frames the node
    ox, oy = pad + geo["dx"], pad + badge + geo["dy"]
    p = geo["plot"]
    on_screen = color_counts(shot, (ox + p["l"], oy + p["t"], ox + p["r"], oy + p["b"]), HELDOUT_COLORS)
    print("held-out pixels on the canvas:", on_screen, clip)
    for key, count in on_screen.items():
        assert count >= 40, (key, on_screen)
    legend = color_counts(shot, (ox, oy + geo["legend"]["t"], ox + p["r"], oy + geo["legend"]["b"]),
                          HELDOUT_COLORS)
    assert all(count > 0 for count in legend.values()), legend
    # The README's picture: the chart widget of that shot.
    from PIL import Image
    chart_shot = os.path.join(OUT, "heldout_chart_widget.png")
    with Image.open(shot) as im:
        im.crop((0, int(oy + geo["chart_y"]) - 4, im.width, im.height)).save(chart_shot, optimize=True)
    assert os.path.getsize(chart_shot) < 150_000
    if UPDATE_ASSETS or not os.path.exists(HELDOUT_DOCS_SHOT):
        os.makedirs(os.path.dirname(HELDOUT_DOCS_SHOT), exist_ok=True)
        shutil.copyfile(chart_shot, HELDOUT_DOCS_SHOT)

    # A narrow node: the stop reason wraps over two rows, the node grows to keep the plot's height.
    cpage.fit_view([101])
    narrow = cpage.evaluate("""() => { const n = app.graph.getNodeById(101);
        n.setSize([330, n.size[1]]); app.canvas.draw(true, true);
        return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => {
            app.canvas.draw(true, true);
            const L = n.draftChart.layout;
            r({rows: L.rows, plot_h: L.plot.b - L.plot.t}) }))) }""")
    stop_rows = narrow["rows"][3:5]
    assert stop_rows[0].startswith("stopped: judge PickScore") and stop_rows[1].endswith("kept update 20"), narrow
    assert " ".join(r.strip() for r in stop_rows) == f"stopped: {STOP_REASON}", narrow
    assert narrow["plot_h"] >= 129, narrow
    cpage.evaluate("() => { const n = app.graph.getNodeById(101); n.setSize([480, n.size[1]]) }")

    # A reload: /draft/status carries the held-out summary (as training_run keeps it), redrawn.
    summary = {"series": HELDOUT_SERIES, "ranking": "judge1", "best_iteration": 20,
               "evaluations": [{"iteration": u, "figures": f} for u, f in HELDOUT_FIGURES.items()],
               "best": HELDOUT_FIGURES[20], "keep": "best", "stop_reason": STOP_REASON}
    status = {"101": {"run": "h2", "status": "finished", "iteration": 50, "total": total,
                      "rewards": rewards, "skipped": 0, "sec_per_iter": 1.5, "eta_s": 0.0,
                      "saved": None, "text": "done", "heldout": summary}}
    route = "**/draft/status"
    cpage.page.route(route, lambda r: r.fulfill(status=200, content_type="application/json",
                                                 body=json.dumps(status)))
    try:
        cpage.reload()
        restored = wait_for(lambda: (lambda c: c and c["run"] == "h2" and c)(cpage.chart(101)), 15,
                            "the held-out chart after the reload")
    finally:
        cpage.page.unroute(route)
    assert restored["restored"] == len(rewards) and restored["rewards"] == rewards, restored
    assert restored["heldout"]["evaluations"] == summary["evaluations"], restored["heldout"]
    assert restored["heldout"]["best_iteration"] == 20 and restored["stopReason"] == STOP_REASON
    assert f"stopped: {STOP_REASON}" in restored["lines"], restored["lines"]
    cpage.evaluate("""() => { const n = app.graph.getNodeById(101); n.setSize([480, n.size[1]]) }""")
    redrawn = heldout_pixels(cpage, 101, "heldout_offscreen_reloaded")
    for key, count in redrawn["plot"].items():
        assert count >= 40, (key, redrawn)
    assert redrawn["bestColumn"] > 0.8 and min(redrawn["box"].values()) >= 8, redrawn

    # A long resumed run (draft.started with its held-out history): 20000 updates, 2001
    # evaluations, drawn one pixel column at a time, the old run's held-out data gone.
    history = [math.sin(i / 300.0) for i in range(20000)]
    long_summary = {"series": HELDOUT_SERIES, "ranking": "judge1", "best_iteration": 4000,
                    "stop_reason": "", "evaluations": [
                        {"iteration": u, "figures": {"judge1": math.sin(u / 3000), "judge2": math.cos(u / 2000),
                                                     "reward": math.log(u + 2), "similarity": u / 1e4}}
                        for u in range(0, 20001, 10)]}
    send(cpage, "draft.started", {"node": "101", "run": "h3", "total": 30000, "rewards": history,
                                  "heldout": long_summary})
    chart = cpage.chart(101)
    assert len(chart["heldout"]["evaluations"]) == 2001 and chart["stopReason"] == "", chart["lines"]
    assert not any(line.startswith("stopped:") for line in chart["lines"])
    long = heldout_pixels(cpage, 101, "heldout_offscreen_long")
    for key, count in long["plot"].items():
        assert count >= 40, (key, long)
    assert long["bestColumn"] > 0.5, long
    send(cpage, "draft.started", {"node": "101", "run": "h4", "total": 10, "rewards": []})
    assert cpage.chart(101)["heldout"] is None  # a run without the check: none of it
    assert_no_problems_from_us(cpage)


@pytest.mark.skipif(not TEMPLATES, reason="no templates in example_workflows/ yet")
@pytest.mark.parametrize("path", TEMPLATES, ids=[os.path.basename(p) for p in TEMPLATES])
def test_template_loads_without_missing_nodes(tpage, path):
    result = bh.render_template(tpage, path, OUT, update_thumbnails=UPDATE_ASSETS)
    assert result["count"] > 0
    assert not result["missing"], f"node types unknown to the frontend: {result['missing']}"
    assert not result["missing_dialog"], result["dialogs"]
    assert os.path.getsize(result["screenshot"]) > 10_000
    trainers = tpage.evaluate("() => app.graph.nodes.filter(n => n.type === 'DRaFTTrainer').map(n => n.id)")
    for node_id in trainers:
        widgets = tpage.evaluate(f"(id) => ({SETTINGS_WIDGETS})(app.graph.getNodeById(id))", node_id)
        assert 0 < len(widgets) <= MAX_TRAINER_WIDGETS, widgets
    for node_id in trainers:  # every trainer got its chart, below all of its widgets
        layout = tpage.evaluate("""(id) => { const n = app.graph.getNodeById(id);
            const w = n.widgets.find(w => w.name === 'draft_reward_chart');
            return w && {y: w.y, h: w.computedHeight, node: n.size[1]} }""", node_id)
        assert layout and layout["y"] + layout["h"] <= layout["node"] + 1, layout
    assert_no_problems_from_us(tpage)


def test_live_chart_survives_reload_and_matches_the_servers_rewards(server, cpage):
    from test_comfyui_nodes import SAVING_NODE, trainer_graph
    iterations = 12
    graph = trainer_graph(server.ckpt_name, iterations=iterations, seed=3, lora_name="draft/browser")
    graph[SAVING_NODE]["inputs"]["preview_every"] = 0  # preview the training samples: no extra sampling
    # Evaluate shows its text; a second trainer on the canvas must keep an empty chart.
    graph["7"] = {"class_type": "DRaFTEvaluate", "inputs": {
        "images": ["4", 3], "reward": ["2", 0], "prompts": "a cat", "chunk_size": 8}}
    ui_graph = dict(graph, **{"8": {"class_type": "DRaFTTrainer", "inputs": {}}})
    cpage.load_api_graph(ui_graph, "draft_browser_test")
    before = server.get("/draft/status").get("4", {}).get("run")
    assert cpage.chart(4)["run"] == before and cpage.chart(8)["rewards"] == []
    t0 = time.time()
    timeline = []  # (seconds, what): printed when something fails

    prompt_id = server.post("/prompt", {"prompt": graph, "client_id": cpage.client_id()})["prompt_id"]

    # The chart grows while the run is in progress.
    seen = []

    def three_live_points():
        status = server.get("/draft/status").get("4", {})
        chart = cpage.chart(4)
        if chart["run"] and chart["run"] != before:
            if not seen or len(chart["rewards"]) != seen[-1]:
                seen.append(len(chart["rewards"]))
        if status.get("status") != "running" and status.get("run") != before:
            raise AssertionError(f"the run ended before the chart had 3 points: {status}, {chart}")
        return chart["run"] != before and len(chart["rewards"]) >= 3 and chart

    chart = wait_for(three_live_points, 240, "three points on the chart")
    timeline.append((round(time.time() - t0, 1), f"{len(chart['rewards'])} points, seen {seen}"))
    assert chart["status"] == "running" and chart["live"] >= 3, chart
    assert seen == sorted(seen), seen  # it only grew, one live event at a time
    status = server.get("/draft/status")["4"]
    assert status["run"] == chart["run"]
    assert chart["rewards"] == status["rewards"][:len(chart["rewards"])]
    assert chart["ma"][-1] == pytest.approx(moving_average(chart["rewards"])[-1], rel=1e-12)
    assert chart["lines"][0].startswith(f"iteration {chart['iteration']} / {iterations}")
    assert cpage.chart(8)["rewards"] == []  # the other trainer shows nothing

    # Reload mid-run: the chart is back from /draft/status right after the page is up.
    cpage.reload()
    restored = wait_for(lambda: (lambda c: c and c["rewards"] and c)(cpage.chart(4)), 15,
                        "the chart after the reload")
    running = server.get("/draft/status")["4"]["status"] == "running"
    timeline.append((round(time.time() - t0, 1), f"reloaded: {len(restored['rewards'])} points, "
                                                 f"{restored['restored']} restored, running: {running}"))
    assert restored["run"] == chart["run"], (restored, timeline)
    assert restored["restored"] >= 3, (restored, timeline)  # from /draft/status, not new events
    assert len(restored["rewards"]) >= len(chart["rewards"])
    assert cpage.chart(8)["rewards"] == []
    if running:  # ...and it keeps growing from the live events
        wait_for(lambda: (lambda c: c["live"] >= 1 or c["status"] != "running")(cpage.chart(4)), 120,
                 f"a live point after the reload {timeline}")

    entry = server.wait(prompt_id, timeout=600)
    timeline.append((round(time.time() - t0, 1), "finished"))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    final = wait_for(lambda: (lambda c: c["status"] == "finished" and c["text"] and c)(cpage.chart(4)),
                     30, "the finished chart and the trainer's text")
    status = server.get("/draft/status")["4"]
    assert status["status"] == "finished" and len(status["rewards"]) == iterations
    assert final["rewards"] == status["rewards"], timeline  # exactly the server's history
    assert final["iteration"] == iterations and final["total"] == iterations
    assert final["ma"] == pytest.approx(moving_average(status["rewards"]), rel=1e-12)
    trainer_text = entry["outputs"]["4"]["text"][0]
    assert final["text"] == trainer_text
    last = [r for r in final["rewards"] if r is not None][-1]
    assert trainer_text.split("->")[-1].strip().startswith(f"{last:.4f}"), (trainer_text, last)
    assert cpage.widget_value(7, "draft_output") == entry["outputs"]["7"]["text"][0]
    assert cpage.widget_value(5, "draft_output") == entry["outputs"]["5"]["text"][0]
    assert cpage.chart(8)["rewards"] == []
    assert not [d for d in cpage.dialogs() if d.strip()], cpage.dialogs()

    # The README picture: the trainer node with its chart.
    cpage.evaluate("""() => { const n = app.graph.getNodeById(4); n.setSize([480, n.size[1]]);
                              app.canvas.setDirty(true, true) }""")
    shot = os.path.join(OUT, "draft_trainer_chart.png")
    cpage.screenshot_node(4, shot)
    assert os.path.getsize(shot) > 20_000
    if UPDATE_ASSETS or not os.path.exists(DOCS_SHOT):
        os.makedirs(os.path.dirname(DOCS_SHOT), exist_ok=True)
        shutil.copyfile(shot, DOCS_SHOT)
    cpage.fit_view()
    cpage.screenshot(os.path.join(OUT, "trainer_run.png"))
    assert_no_problems_from_us(cpage)
