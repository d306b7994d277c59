"""The canvas extension and the example workflows in the real ComfyUI frontend, in headless Chromium."""
import json
import os
import shutil
import time

import pytest
import torch
from playwright.sync_api import expect
from tiny_clip import OPEN_CLIP, aesthetic_mlp, open_clip_model, write_aesthetic_mlp
from ui_workflows import EXAMPLES, REPO, api_to_ui, ui_to_api

from comfy_draft.plotting import curve_panels, smoothed

pytestmark = pytest.mark.slow
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(comfy_server):
    if not CHROMIUM:
        if os.environ.get("COMFY_DRAFT_REQUIRE_BROWSER"):
            pytest.fail("Chromium is required (COMFY_DRAFT_REQUIRE_BROWSER) but not installed")
        pytest.skip("Chromium not installed (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    comfy_server.post("/settings/Comfy.TutorialCompleted", True)  # no first-visit templates dialog
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.goto(comfy_server.url)
        page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        yield page
        browser.close()


def load_workflow(page, workflow):
    return page.evaluate("""async (workflow) => {
        await app.loadGraphData(workflow);
        return app.graph.nodes.map((n) => [n.type, !!LiteGraph.registered_node_types[n.type]]);
    }""", workflow)


EXTENSION = "comfydraftdraftrewardfinetuning.canvas"  # the pack's namespace: its DisplayName, as comfy-test lint asks


def test_extension_is_loaded(page):
    assert page.evaluate(f"app.extensions.some((e) => e.name === '{EXTENSION}')")
    assert not [e for e in page.errors if "comfy_draft" in e]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_workflow_loads_without_missing_nodes(page, name):
    workflow = json.loads((REPO / "workflows" / name).read_text())
    nodes = load_workflow(page, workflow)
    assert len(nodes) == len(workflow["nodes"])
    assert all(registered for _, registered in nodes), nodes  # (model files may be missing here: not nodes)
    assert page.get_by_text("Missing Node Types").count() == 0


# The training chart of node `id`: its steps, its panels' metric keys, the smoothed reward it draws and, per uPlot
# panel, the title, legend labels and the tick labels uPlot drew on the axes (axis._values).
CHART = """(id) => {
    const chart = app.graph.getNodeById(id)?.draftChart;
    if (!chart) return null;
    const steps = chart.chart.steps;
    return {steps: steps.map((m) => m.step), validated: steps.filter((m) => 'val_reward' in m).map((m) => m.step),
            kept: chart.chart.kept_step, keys: (chart.panels ?? []).map(([, keys]) => keys),
            smoothed: chart.plots[0]?.data[2],
            panels: chart.plots.map((u) => ({title: u.root.querySelector('.u-title').textContent,
                                             series: u.series.slice(1).map((s) => s.label),
                                             x: u.axes[0]._values, y: u.axes[1]._values,
                                             height: u.root.getBoundingClientRect().height}))};
}"""


def chart(page):
    return page.evaluate(CHART, 3)


def wait_chart(page, comfy_server, done, timeout=900, seen=None):  # generous: CI machines can be busy
    """Polls the chart until `done(chart)`; `seen` collects the step counts on the way."""
    deadline = time.time() + timeout
    while time.time() < deadline and "invalid prompt" not in comfy_server.log():
        state = chart(page)
        count = len(state["steps"]) if state else 0
        if seen is not None and (not seen or seen[-1] != count):
            seen.append(count)
        if state and done(state):
            return state
        time.sleep(0.2)
    pytest.fail(f"chart not as expected: {chart(page)}\n{comfy_server.log()[-3000:]}")


def is_number(text):
    try:
        float(text.replace(",", "").replace("\u2212", "-"))
        return True
    except ValueError:
        return False


def show_chart(page, name):
    """Scrolls the canvas to the trainer node (id 3) and saves a screenshot of the whole node, chart included (in a
    window tall enough for it)."""
    height = page.evaluate("app.graph.getNodeById(3).size[1]")
    viewport = page.viewport_size
    page.set_viewport_size({"width": viewport["width"], "height": max(viewport["height"], int(height) + 300)})
    page.evaluate("""() => {
        const n = app.graph.getNodeById(3);
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [140 - n.pos[0], 120 - n.pos[1]];
        app.graph.setDirtyCanvas(true, true);
    }""")
    page.wait_for_timeout(500)
    box = page.evaluate("""() => {
        const n = app.graph.getNodeById(3), chart = n.draftChart.element.getBoundingClientRect();
        const canvas = app.canvas.canvas.getBoundingClientRect(), top = canvas.top + 120 - LiteGraph.NODE_TITLE_HEIGHT;
        return {x: canvas.left + 125, y: top - 10, width: n.size[0] + 30, height: chart.bottom + 15 - (top - 10)};
    }""")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), clip=box)
    page.set_viewport_size(viewport)
    assert (ARTIFACTS / name).stat().st_size > 10_000
    return box


STEPS = 12  # long enough to reload the page and take a screenshot mid-run


def test_trainer_chart_updates_during_a_run_and_survives_a_reload(page, comfy_server, tiny_sd15, comfyui):
    folder = comfy_server.base_dir / "models" / "reward_models"
    folder.mkdir(parents=True, exist_ok=True)
    write_aesthetic_mlp(folder / "sac+logos+ava1-l14-linearMSE.pth", aesthetic_mlp(OPEN_CLIP["embed_dim"]))
    torch.save(open_clip_model(OPEN_CLIP, quick_gelu=True).state_dict(), folder / "ViT-L-14.pt")
    page.evaluate("app.refreshComboInNodes && app.refreshComboInNodes()")

    classes = comfyui.nodes.NODE_CLASS_MAPPINGS
    prompt, positions, titles = EXAMPLES["train_aesthetic_lora_draft_lv.json"]()
    prompt["1"]["inputs"]["ckpt_name"] = tiny_sd15
    prompt["3"]["inputs"].update(training_steps=STEPS, sampling_steps=4, width=64, height=64, lora_name="draft/browser")
    prompt["13"]["inputs"]["save_every"] = 0
    prompt["7"]["inputs"].update(width=64, height=64)
    prompt["8"]["inputs"]["steps"] = 4
    prompt["11"]["inputs"].update(every=2, seeds=2)
    load_workflow(page, api_to_ui(prompt, classes, positions, titles))
    assert ui_to_api(api_to_ui(prompt, classes, positions, titles), classes) == json.loads(json.dumps(prompt))
    page.evaluate("app.queuePrompt(0, 1)")

    # live: the websocket events grow the chart while training runs
    seen = []
    wait_chart(page, comfy_server, lambda c: len(c["steps"]) >= 2, seen=seen)
    assert any(0 < n < STEPS for n in seen)  # it updated while training ran, not only at the end

    # a page reload mid-run: the chart replays the steps done so far from /comfy_draft/history
    done_before = len(comfy_server.get("/comfy_draft/history")["3"]["steps"])
    page.reload()
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120_000)
    replayed = wait_chart(page, comfy_server, lambda c: len(c["steps"]) >= done_before)
    assert replayed["steps"][:done_before] == list(range(1, done_before + 1))
    assert done_before < STEPS, "the run ended before the page was reloaded"

    # mid-run, after the reload: held-out validation series in their panels, axes with numeric labels
    mid = wait_chart(page, comfy_server, lambda c: len(c["validated"]) >= 2 and len(c["panels"]) >= 3)
    show_chart(page, "trainer_chart_mid_run.png")
    mid = chart(page)
    assert len(mid["steps"]) < STEPS, "the run ended before the mid-run screenshot"
    assert len(mid["panels"]) >= 3 and all(p["x"] and p["y"] and all(map(is_number, p["x"] + p["y"]))
                                           for p in mid["panels"]), mid["panels"]
    assert {"held-out reward"} <= set(mid["panels"][0]["series"]), mid["panels"]
    print(f"reloaded after {done_before} of {STEPS} steps; mid-run screenshot at step {len(mid['steps'])}")

    state = wait_chart(page, comfy_server, lambda c: len(c["steps"]) == STEPS and c["kept"] is not None)
    assert state["steps"] == list(range(1, STEPS + 1))
    assert state["validated"] == list(range(2, STEPS + 1, 2))  # held-out validation points on the chart
    panels = {p["title"]: p for p in state["panels"]}
    assert len(panels) >= 3 and {"reward", "diversity (held-out)", "gradient norm / KL"} <= set(panels), panels
    assert {"reward (per step)", "reward (smoothed)", "held-out reward"} <= set(panels["reward"]["series"])
    assert "diversity floor" in panels["diversity (held-out)"]["series"]
    for p in panels.values():  # real axes: numeric tick labels on both, and drawn
        assert p["height"] > 100 and p["y"] and p["x"], p
        assert all(is_number(v) for v in p["x"] + p["y"]), p
        assert len(p["y"]) >= 2 and len(set(p["y"])) == len(p["y"]), p  # values to read, none repeated
    # the panels and the smoothed reward are plotting.py's, as the reward_curve image draws them
    steps = comfy_server.get("/comfy_draft/history")["3"]["steps"]
    with_data = [(title, [k for k in keys if any(k in m for m in steps)]) for title, keys in curve_panels(steps)]
    assert [(p["title"], keys) for p, keys in zip(state["panels"], state["keys"])] == [p for p in with_data if p[1]]
    assert state["smoothed"] == pytest.approx(smoothed([m["reward"] for m in steps]), rel=1e-9)

    # the node's chart on screen: its bottom in view; hovering a panel shows values in uPlot's legend
    show_chart(page, "trainer_chart.png")
    shown, needed = page.evaluate("""() => {
        const chart = app.graph.getNodeById(3).draftChart;
        return [chart.element.getBoundingClientRect().height, chart.content.getBoundingClientRect().height];
    }""")
    assert shown >= needed - 2, (shown, needed)  # no panel or legend cut off
    over = page.locator(".comfy-draft-chart .u-over").first
    over.hover()
    values = page.locator(".comfy-draft-chart .u-legend").first.locator(".u-value").all_inner_texts()
    assert any(is_number(v) for v in values[1:]), values
    assert not [e for e in page.errors if "comfy_draft" in e or "uPlot" in e], page.errors

    # the workflow reopened after the run: the final curve, kept step included
    load_workflow(page, api_to_ui(prompt, classes, positions, titles))
    reopened = wait_chart(page, comfy_server, lambda c: len(c["steps"]) == STEPS, timeout=30)
    assert reopened["kept"] == state["kept"] and len(reopened["panels"]) == len(state["panels"])


@pytest.mark.parametrize("checkpointing", [None, False])
def test_a_workflow_saved_before_the_options_node_keeps_its_settings(page, comfyui, checkpointing):
    """The training example as saved before the advanced settings moved: the canvas restores the trainer's values by
    name and puts the moved ones on a new DRaFT Training Options node, so it queues the run the example queues now.
    A workflow saved with precision, accumulation and the boolean checkpointing (False: gradient_checkpointing "off",
    its name and value now) keeps them too."""
    old = json.loads((REPO / "tests" / "data" / "train_workflow_before_options_node.json").read_text())
    if checkpointing is not None:
        (trainer,) = [n for n in old["nodes"] if n["type"] == "DRaFTTrainLoRA"]
        trainer["widgets_values"] += ["auto", 1, checkpointing]
    load_workflow(page, old)
    queued = page.evaluate("async () => (await app.graphToPrompt()).output")
    expected, _, _ = EXAMPLES["train_aesthetic_lora_draft_lv.json"]()
    queued = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in queued.items()}  # no _meta
    options_id = queued["3"]["inputs"].pop("options")[0]
    # reward_resolution 256, save_every 50, the rest the defaults (the variant settings added since included)
    want = dict(expected["13"]["inputs"], **({} if checkpointing is None else {"gradient_checkpointing": "off"}))
    assert queued[options_id]["class_type"] == expected["13"]["class_type"]
    assert {k: queued[options_id]["inputs"].get(k) for k in want} == want
    assert queued["3"]["inputs"] == {k: v for k, v in expected["3"]["inputs"].items() if k != "options"}
    assert not [e for e in page.errors if "comfy_draft" in e], page.errors


def test_the_text_every_node_of_the_pack_returns_is_shown_on_it(page, comfy_server, tiny_sd15, comfyui):
    """One rule for the whole pack (the node's python_module): the text a node returns in ui.text appears on it. The
    AIG sweep's table was left out by the hand-written list of nodes this replaced; the scores of its grid too."""
    classes = comfyui.nodes.NODE_CLASS_MAPPINGS
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sd15}},
        "2": {"class_type": "DRaFTBuiltinReward", "inputs": {"kind": "brightness"}},
        "3": {"class_type": "DRaFTAIGSweep", "inputs": {
            "base_model": ["1", 0], "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "reward": ["2", 0],
            "prompts": "a watercolor fox", "negative_prompt": "", "schedule": "step_f", "values": "0, 1", "seeds": 2,
            "first_seed": 5, "steps": 2, "cfg": 5.0, "width": 64, "height": 64}},
        "4": {"class_type": "DRaFTScoreImages", "inputs": {"images": ["3", 1], "reward": ["2", 0], "prompt": ""}},
    }
    load_workflow(page, api_to_ui(prompt, classes, {"1": (20, 60), "2": (20, 300), "3": (400, 60), "4": (800, 60)}))
    page.evaluate("app.queuePrompt(0, 1)")
    shown = """() => Object.fromEntries([3, 4].map((id) => [id, app.graph.getNodeById(id).widgets
        .find((w) => w.name === 'comfydraftdraftrewardfinetuning_text')?.inputEl.value]))"""
    deadline = time.time() + 600
    while time.time() < deadline and "invalid prompt" not in comfy_server.log():
        text = page.evaluate(shown)
        if text["3"] and text["4"]:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no text on the nodes: {page.evaluate(shown)}\n{comfy_server.log()[-3000:]}")
    table = text["3"].splitlines()
    assert table[0] == "AIG step_f" and table[1].startswith("| f | reward |") and len(table) == 5, table
    assert text["4"].splitlines()[0] == "brightness" and text["4"].splitlines()[-1].startswith("mean: "), text["4"]
    textareas = page.evaluate("[...document.querySelectorAll('textarea')].filter((t) => t.offsetParent)"
                              ".map((t) => t.value)")
    assert text["3"] in textareas and text["4"] in textareas  # on the canvas, not only in the widget's value
    assert not [e for e in page.errors if "comfy_draft" in e], page.errors


def test_a_nodes_help_page_opens_in_the_frontends_help_panel(page, comfyui):
    """The frontend's own node help: a selected node's info button (selection toolbox) opens the side panel's Info
    tab, which fetches /extensions/<pack>/docs/<NodeName>.md, the page in web/docs/."""
    classes = comfyui.nodes.NODE_CLASS_MAPPINGS
    load_workflow(page, api_to_ui({"1": {"class_type": "DRaFTValidation", "inputs": {}}}, classes, {"1": (200, 200)}))
    page.evaluate("app.canvas.selectNode(app.graph.getNodeById(1))")
    page.locator('[data-testid="info-button"]').click()
    help_page = (REPO / "web" / "docs" / "DRaFTValidation.md").read_text()
    first_sentence = help_page.split("\n\n")[1].replace("\n", " ").split(". ")[0]  # below the title
    first_sentence = first_sentence.replace("**", "").replace("`", "")  # as rendered: no Markdown marks
    expect(page.get_by_text(first_sentence)).to_be_visible(timeout=30_000)
    expect(page.get_by_role("heading", name="Memory and time")).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "node_help_panel.png"))
