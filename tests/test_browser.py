"""The canvas extension and the example workflows in the real ComfyUI frontend, in headless Chromium."""
import json
import os
import shutil
import time

import pytest
import torch
from tiny_clip import OPEN_CLIP, aesthetic_mlp, open_clip_model, write_aesthetic_mlp
from ui_workflows import EXAMPLES, REPO, api_to_ui, ui_to_api

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


def test_extension_is_loaded(page):
    assert page.evaluate("app.extensions.some((e) => e.name === 'comfy_draft')")
    assert not [e for e in page.errors if "comfy_draft" in e]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_workflow_loads_without_missing_nodes(page, name):
    workflow = json.loads((REPO / "workflows" / name).read_text())
    nodes = load_workflow(page, workflow)
    assert len(nodes) == len(workflow["nodes"])
    assert all(registered for _, registered in nodes), nodes  # (model files may be missing here: not nodes)
    assert page.get_by_text("Missing Node Types").count() == 0


def test_trainer_chart_updates_during_a_run(page, comfy_server, tiny_sd15, comfyui):
    folder = comfy_server.base_dir / "models" / "reward_models"
    folder.mkdir(parents=True, exist_ok=True)
    write_aesthetic_mlp(folder / "sac+logos+ava1-l14-linearMSE.pth", aesthetic_mlp(OPEN_CLIP["embed_dim"]))
    torch.save(open_clip_model(OPEN_CLIP, quick_gelu=True).state_dict(), folder / "ViT-L-14.pt")
    page.evaluate("app.refreshComboInNodes && app.refreshComboInNodes()")

    classes = comfyui.nodes.NODE_CLASS_MAPPINGS
    prompt, positions, titles = EXAMPLES["train_aesthetic_lora_draft_lv.json"]()
    prompt["1"]["inputs"]["ckpt_name"] = tiny_sd15
    prompt["3"]["inputs"].update(training_steps=6, sampling_steps=4, width=64, height=64, save_every=0,
                                 lora_name="draft/browser")
    prompt["7"]["inputs"].update(width=64, height=64)
    prompt["8"]["inputs"]["steps"] = 4
    prompt["11"]["inputs"].update(every=3, seeds=2)
    load_workflow(page, api_to_ui(prompt, classes, positions, titles))
    assert ui_to_api(api_to_ui(prompt, classes, positions, titles), classes) == json.loads(json.dumps(prompt))
    page.evaluate("app.canvas.ds.offset = [-330, 0]; app.canvas.ds.scale = 1; app.graph.setDirtyCanvas(true, true)")
    page.evaluate("app.queuePrompt(0, 1)")

    seen, deadline = [], time.time() + 300
    while time.time() < deadline and "invalid prompt" not in comfy_server.log():
        length = page.evaluate("app.graph.getNodeById(3).draftHistory?.length ?? 0")
        if not seen or seen[-1] != length:
            seen.append(length)
        if length == 6:
            break
        time.sleep(0.2)
    assert seen[-1] == 6, f"chart history lengths seen: {seen}\n{comfy_server.log()[-3000:]}"
    assert any(0 < n < 6 for n in seen)  # it updated while training ran, not only at the end
    steps = page.evaluate("app.graph.getNodeById(3).draftHistory.map((m) => m.step)")
    assert steps == [1, 2, 3, 4, 5, 6]
    validated = page.evaluate("app.graph.getNodeById(3).draftHistory.filter((m) => 'val_reward' in m).map((m) => m.step)")
    assert validated == [3, 6]  # held-out validation points on the chart
    page.wait_for_timeout(500)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "trainer_chart.png"))
    assert (ARTIFACTS / "trainer_chart.png").stat().st_size > 10_000
