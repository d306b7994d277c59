"""ComfyUI UI-format workflows (what the canvas saves and loads by drag and drop) <-> API prompts.

`python tests/ui_workflows.py` regenerates the example workflows in workflows/ from the API-format
descriptions below (widget order comes from the node classes of a booted ComfyUI).
"""
import json
import pathlib

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
REPO = pathlib.Path(__file__).resolve().parents[1]


def node_inputs(cls):
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def widget_names(cls):
    """(name, has a control_after_generate value) for each widget input, in the canvas's order."""
    out = []
    for name, spec in node_inputs(cls).items():
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        if (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput"):
            # the frontend adds a "control after generate" value after seeds, flagged or not
            control = options.get("control_after_generate") or (kind == "INT" and name in ("seed", "noise_seed"))
            out.append((name, bool(control)))
    return out


def output_names(cls):
    return list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)


def api_to_ui(prompt, classes, positions, titles=None):
    """A UI workflow for an API prompt; `positions` maps node id -> (x, y)."""
    nodes, links = [], []
    for order, (node_id, node) in enumerate(prompt.items()):
        cls = classes[node["class_type"]]
        widgets = dict(widget_names(cls))
        values, inputs = [], []
        for name, control in widget_names(cls):
            if name in node["inputs"] and not isinstance(node["inputs"][name], list):
                values.append(node["inputs"][name])
                if control:
                    values.append("fixed")
        for name, spec in node_inputs(cls).items():
            if name not in widgets:
                inputs.append({"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": None})
        ui = {"id": int(node_id), "type": node["class_type"], "pos": list(positions[node_id]), "size": [320, 120],
              "flags": {}, "order": order, "mode": 0, "inputs": inputs,
              "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                          for i, (n, t) in enumerate(zip(output_names(cls), cls.RETURN_TYPES))],
              "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": values}
        if titles and node_id in titles:
            ui["title"] = titles[node_id]
        nodes.append(ui)
    by_id = {str(n["id"]): n for n in nodes}
    for node_id, node in prompt.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                link_id = len(links) + 1
                source, slot = by_id[value[0]], value[1]
                target_input = next(i for i in by_id[node_id]["inputs"] if i["name"] == name)
                target_input["link"] = link_id
                source["outputs"][slot]["links"].append(link_id)
                target_slot = by_id[node_id]["inputs"].index(target_input)
                links.append([link_id, int(value[0]), slot, int(node_id), target_slot, source["outputs"][slot]["type"]])
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def ui_to_api(workflow, classes):
    """The API prompt ComfyUI's frontend would queue for a UI workflow (widgets and links)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        cls = classes[node["type"]]
        values, inputs = list(node.get("widgets_values", [])), {}
        for name, control in widget_names(cls):
            if not values:
                break  # trailing optional widgets the workflow does not set
            inputs[name] = values.pop(0)
            if control:
                values.pop(0)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# ----- the example workflows -------------------------------------------------------------------------------

CKPT = "v1-5-pruned-emaonly.safetensors"


def aesthetic_reward():
    """The LAION aesthetic reward from its published file names (a fresh node dict each time)."""
    return {"class_type": "DRaFTRewardLoader", "inputs": {
        "family": "aesthetic", "file": "sac+logos+ava1-l14-linearMSE.pth", "clip_file": "ViT-L-14.pt", "text": "",
        "maximize": True}}


def sampling_nodes(first, model, clip, vae, seed=1, prompt="a lighthouse at dusk, oil painting"):
    a, b, c, d, e, f = (str(first + i) for i in range(6))
    return {
        a: {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": clip}},
        b: {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": clip}},
        c: {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        d: {"class_type": "KSampler", "inputs": {"model": model, "positive": [a, 0], "negative": [b, 0],
                                                 "latent_image": [c, 0], "seed": seed, "steps": 50, "cfg": 7.5,
                                                 "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}},
        e: {"class_type": "VAEDecode", "inputs": {"samples": [d, 0], "vae": vae}},
        f: {"class_type": "PreviewImage", "inputs": {"images": [e, 0]}},
    }


def training_options(**overrides):
    """A DRaFT Training Options node with the trainer's defaults, some overridden."""
    return {"class_type": "DRaFTTrainingOptions", "inputs": {
        "precision": "auto", "accumulation": 1, "gradient_checkpointing": "auto", "lv_samples": 2, "k": 1, "kl_coef": 0.0,
        "reward_resolution": 0, "save_every": 0, **overrides}}


def train_aesthetic():
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": aesthetic_reward(),
        "3": {"class_type": "DRaFTTrainLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "reward": ["2", 0],
            "prompts": "a lighthouse at dusk, oil painting\na cat sitting on a windowsill\na bowl of fruit on a table",
            "negative_prompt": "", "variant": "draft-lv", "training_steps": 200, "sampling_steps": 50, "cfg": 7.5,
            "width": 512, "height": 512, "batch_size": 1, "learning_rate": 4e-4, "rank": 8, "seed": 0,
            "lora_name": "draft/aesthetic", "resume_lora": "none", "resume_state": "none", "validation": ["11", 0],
            "options": ["13", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}},
        **sampling_nodes(5, ["3", 0], ["1", 1], ["1", 2]),
        "11": {"class_type": "DRaFTValidation", "inputs": {
            "prompts": "a portrait of an old sailor\na mountain lake at sunrise", "seeds": 4, "first_seed": 1000000000,
            "every": 25, "keep": "best", "criterion": "reward", "diversity_floor": 0.7, "patience": 0,
            "judge_1": ["12", 0]}},
        "12": {"class_type": "DRaFTBuiltinReward", "inputs": {"kind": "saturation"}},
        "13": training_options(reward_resolution=256, save_every=50),
    }
    # the trainer is as wide as its chart (MIN_WIDTH in web/comfy_draft.js): the nodes on its right start after it
    positions = {"1": (20, 60), "2": (20, 260), "3": (400, 60), "4": (880, 60), "5": (880, 380), "6": (880, 560),
                 "7": (880, 740), "8": (1240, 380), "9": (1600, 380), "10": (1600, 560), "11": (20, 460),
                 "12": (20, 840), "13": (20, 980)}
    titles = {"12": "judge: watch saturation"}
    return prompt, positions, titles


def score_images():
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": aesthetic_reward(),
        "3": {"class_type": "DRaFTBuiltinReward", "inputs": {"kind": "saturation"}},
        "4": {"class_type": "DRaFTRewardCombine", "inputs": {"reward_a": ["2", 0], "weight_a": 1.0,
                                                             "reward_b": ["3", 0], "weight_b": -1.0}},
        "5": {"class_type": "DRaFTScoreImages", "inputs": {"images": ["1", 0], "reward": ["2", 0], "prompt": ""}},
        "6": {"class_type": "DRaFTScoreImages", "inputs": {"images": ["1", 0], "reward": ["4", 0], "prompt": ""}},
    }
    positions = {"1": (20, 60), "2": (20, 420), "3": (20, 620), "4": (400, 520), "5": (760, 60), "6": (760, 420)}
    return prompt, positions


def mix_loras():
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["1", 0], "lora_name": "draft/aesthetic_00001_.safetensors", "strength_model": 0.8}},
        "3": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["2", 0], "lora_name": "draft/pickscore_00001_.safetensors", "strength_model": 0.5}},
        **sampling_nodes(4, ["1", 0], ["1", 1], ["1", 2]),
        **{k: v for k, v in sampling_nodes(10, ["3", 0], ["1", 1], ["1", 2]).items() if k in ("13", "14")},
        "16": {"class_type": "ImageBatch", "inputs": {"image1": ["8", 0], "image2": ["14", 0]}},
    }
    # the mixed model samples with the same prompts, latent and seed as the base model
    prompt["13"]["inputs"].update(positive=["4", 0], negative=["5", 0], latent_image=["6", 0])
    prompt["14"]["inputs"]["samples"] = ["13", 0]
    del prompt["9"]
    prompt["17"] = {"class_type": "SaveImage", "inputs": {"images": ["16", 0], "filename_prefix": "draft/base_vs_mix"}}
    positions = {"1": (20, 60), "2": (20, 260), "3": (20, 400), "4": (400, 60), "5": (400, 240), "6": (400, 420),
                 "7": (760, 60), "8": (1120, 60), "13": (760, 420), "14": (1120, 420), "16": (1400, 240),
                 "17": (1700, 240)}
    titles = {"2": "LoRA A (alpha)", "3": "LoRA B (beta)", "7": "base model", "13": "base + alpha A + beta B"}
    return prompt, positions, titles


def strength_sweep():
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": aesthetic_reward(),
        "3": {"class_type": "DRaFTLoRAStrengthSweep", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "lora_name": "draft/aesthetic_00001_.safetensors",
            "reward": ["2", 0], "prompts": "a portrait of an old sailor\na mountain lake at sunrise",
            "negative_prompt": "", "strengths": "0, 0.25, 0.5, 0.75, 1, 1.5", "seeds": 4, "first_seed": 1000000000,
            "steps": 50, "cfg": 7.5, "width": 512, "height": 512}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }
    positions = {"1": (20, 60), "2": (20, 260), "3": (400, 60), "4": (800, 60)}
    return prompt, positions


def anneal_lora_strength():
    """Inference-time interpolation from the base model to the fine-tuned one over the sampling steps:
    the LoRA as a ComfyUI hook whose strength follows keyframes from 0 (first step) to 1 (last)."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CreateHookLoraModelOnly", "inputs": {
            "lora_name": "draft/aesthetic_00001_.safetensors", "strength_model": 1.0}},
        "3": {"class_type": "CreateHookKeyframesInterpolated", "inputs": {
            "strength_start": 0.0, "strength_end": 1.0, "interpolation": "linear", "start_percent": 0.0,
            "end_percent": 1.0, "keyframes_count": 5, "print_keyframes": False}},
        "4": {"class_type": "SetHookKeyframes", "inputs": {"hooks": ["2", 0], "hook_kf": ["3", 0]}},
        **sampling_nodes(5, ["1", 0], ["1", 1], ["1", 2]),
        "11": {"class_type": "PairConditioningSetProperties", "inputs": {
            "positive_NEW": ["5", 0], "negative_NEW": ["6", 0], "strength": 1.0, "set_cond_area": "default",
            "hooks": ["4", 0]}},
    }
    prompt["8"]["inputs"].update(positive=["11", 0], negative=["11", 1])
    positions = {"1": (20, 60), "2": (20, 260), "3": (20, 400), "4": (400, 300), "5": (400, 60), "6": (400, 480),
                 "7": (400, 660), "11": (760, 300), "8": (1100, 60), "9": (1460, 60), "10": (1460, 240)}
    titles = {"3": "LoRA strength 0 -> 1 over the steps"}
    return prompt, positions, titles


def pgraft_lora_above_t():
    """P-GRAFT's inference with ComfyUI's own samplers: the LoRA as a hook at strength 1 from the first step and 0
    from the intermediate step t on, so the base model finishes. The second keyframe's start_percent is the
    `comfy_draft_pgraft_start_percent` the trainer writes into the LoRA file (here t = half of 50 'ddim_uniform'
    steps); the DRaFT P-GRAFT Sampler node does the same from the file alone."""
    from comfy_draft.policy import comfy_start_percent

    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CreateHookLoraModelOnly", "inputs": {
            "lora_name": "draft/pgraft_00001_.safetensors", "strength_model": 1.0}},
        "3": {"class_type": "CreateHookKeyframe", "inputs": {"strength_mult": 1.0, "start_percent": 0.0}},
        "12": {"class_type": "CreateHookKeyframe", "inputs": {
            "strength_mult": 0.0, "start_percent": round(comfy_start_percent(0.5, 50), 4), "prev_hook_kf": ["3", 0]}},
        "4": {"class_type": "SetHookKeyframes", "inputs": {"hooks": ["2", 0], "hook_kf": ["12", 0]}},
        **sampling_nodes(5, ["1", 0], ["1", 1], ["1", 2]),
        "11": {"class_type": "PairConditioningSetProperties", "inputs": {
            "positive_NEW": ["5", 0], "negative_NEW": ["6", 0], "strength": 1.0, "set_cond_area": "default",
            "hooks": ["4", 0]}},
    }
    prompt["8"]["inputs"].update(positive=["11", 0], negative=["11", 1])
    positions = {"1": (20, 60), "2": (20, 260), "3": (20, 400), "12": (20, 520), "4": (400, 300), "5": (400, 60),
                 "6": (400, 480), "7": (400, 660), "11": (760, 300), "8": (1100, 60), "9": (1460, 60),
                 "10": (1460, 240)}
    titles = {"3": "LoRA on from the first step", "12": "base model from t on (the file's start_percent)"}
    return prompt, positions, titles


def train_flow_lora(loaders, steps, guidance=None):
    """DRaFT-LV on a flow model loaded as ComfyUI's templates load it (`loaders`: ids "1" MODEL, "2" CLIP, "3" VAE),
    at its native size (width/height 0: 1024), cfg 1 (guidance-distilled), then a sample with the LoRA by KSampler
    `euler` + `simple` (what the trainer's sampler equals)."""
    prompt = {
        **loaders,
        "4": aesthetic_reward(),
        "5": {"class_type": "DRaFTTrainLoRA", "inputs": {
            "model": ["1", 0], "clip": ["2", 0], "vae": ["3", 0], "reward": ["4", 0],
            "prompts": "a lighthouse at dusk, oil painting\na cat sitting on a windowsill\na bowl of fruit on a table",
            "negative_prompt": "", "variant": "draft-lv", "training_steps": 100, "sampling_steps": steps, "cfg": 1.0,
            "width": 0, "height": 0, "batch_size": 1, "learning_rate": 2e-4, "rank": 16, "seed": 0,
            "lora_name": "draft/flow_aesthetic", "resume_lora": "none", "resume_state": "none",
            "options": ["6", 0]}},
        "6": training_options(reward_resolution=512, save_every=25, precision="bf16"),
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 2]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk, oil painting",
                                                         "clip": ["2", 0]}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "11": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "positive": ["8", 0], "negative": ["9", 0],
                                                    "latent_image": ["10", 0], "seed": 1, "steps": steps, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["3", 0]}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}},
    }
    positions = {"1": (20, 60), "2": (20, 200), "3": (20, 380), "4": (20, 500), "5": (400, 60), "6": (20, 700),
                 "7": (880, 60), "8": (880, 380), "9": (880, 560), "10": (880, 740), "11": (1240, 380),
                 "12": (1600, 380), "13": (1600, 560)}
    if guidance is not None:  # Flux dev: the guidance its sampling expects (the trainer uses the same 3.5 default)
        prompt["14"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["8", 0], "guidance": guidance}}
        prompt["11"]["inputs"]["positive"] = ["14", 0]
        positions["14"] = (1240, 200)
    return prompt, positions


def train_flux_lora():
    return train_flow_lora({
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                         "clip_name2": "t5xxl_fp16.safetensors", "type": "flux",
                                                         "device": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}}}, steps=20, guidance=3.5)


def train_zimage_lora():
    return train_flow_lora({
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "z_image_turbo_bf16.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2",
                                                     "device": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}}}, steps=8)


def noise_correction():
    """Inverse noise correction: a folder of 512 px images (ComfyUI's input/my_images) inverted to noise through SD1.5's
    DDIM sampler, a corrector trained on the noises, then SamplerCustomAdvanced from corrected noise beside the same
    sampler from plain noise of the same seed, on the inversion's step grid (the corrector's SIGMAS)."""
    common = {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0]}
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor painting", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": "my_images"}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "DRaFTInvertToNoise", "inputs": dict(common, latent=["5", 0], steps=50, cfg=3.0,
                                                                iterations=30, tolerance=1e-5, batch_size=4)},
        "7": {"class_type": "DRaFTTrainNoiseCorrector", "inputs": {
            "inverted_noise": ["6", 0], "training_steps": 2000, "width": 32, "batch_size": 64, "learning_rate": 1e-3,
            "seed": 0, "filename": "watercolor"}},
        "8": {"class_type": "DRaFTCorrectedNoise", "inputs": {"noise_corrector": ["7", 0], "noise_seed": 1,
                                                              "corrector_steps": 20}},
        "9": {"class_type": "CFGGuider", "inputs": dict(common, cfg=3.0)},
        "10": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "ddim"}},
        "11": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 4}},
        "15": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
    }
    for first, noise in ((12, "8"), (16, "15")):
        a, b, c = (str(first + i) for i in range(3))
        prompt[a] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": [noise, 0], "guider": ["9", 0], "sampler": ["10", 0], "sigmas": ["8", 1], "latent_image": ["11", 0]}}
        prompt[b] = {"class_type": "VAEDecode", "inputs": {"samples": [a, 0], "vae": ["1", 2]}}
        prompt[c] = {"class_type": "PreviewImage", "inputs": {"images": [b, 0]}}
    positions = {"1": (20, 60), "2": (400, 60), "3": (400, 260), "4": (20, 420), "5": (400, 460), "6": (760, 60),
                 "7": (1120, 60), "8": (1480, 60), "9": (1120, 420), "10": (1120, 620), "11": (1120, 760),
                 "15": (1480, 560), "12": (1840, 60), "13": (2200, 60), "14": (2560, 60), "16": (1840, 560),
                 "17": (2200, 560), "18": (2560, 560)}
    titles = {"14": "from corrected noise", "18": "from plain noise (same seed)"}
    return prompt, positions, titles


EXAMPLES = {"train_aesthetic_lora_draft_lv.json": train_aesthetic, "anneal_lora_strength.json": anneal_lora_strength,
            "score_images.json": score_images, "mix_two_loras.json": mix_loras,
            "lora_strength_sweep.json": strength_sweep, "pgraft_lora_above_t.json": pgraft_lora_above_t,
            "train_flux_lora.json": train_flux_lora, "train_zimage_lora.json": train_zimage_lora,
            "noise_correction.json": noise_correction}


def write_examples(classes, folder=REPO / "workflows"):
    folder.mkdir(exist_ok=True)
    for name, make in EXAMPLES.items():
        prompt, positions, *titles = make()
        workflow = api_to_ui(prompt, classes, positions, *titles)
        (folder / name).write_text(json.dumps(workflow, indent=1) + "\n")


if __name__ == "__main__":
    import tempfile

    from comfyui_harness import InProcessComfy

    app = InProcessComfy(tempfile.mkdtemp())
    write_examples(app.nodes.NODE_CLASS_MAPPINGS)
