"""What the canvas shows of the pack's nodes: a tooltip on every input, a help page for every node, and a trainer
with few widgets whose advanced settings live on the DRaFT Training Options node."""
import sys

from ui_workflows import REPO, output_names, training_options, widget_names

# The frontend's node help panel reads /extensions/<pack>/docs/<NodeName>.md: web/docs/ here.
HELP = REPO / "web" / "docs"
HELP_SECTIONS = ["## When to use it", "## Inputs", "## Outputs", "## Memory and time", "## Example", "## More"]


def pack_nodes(comfyui):
    return sys.modules[comfyui.nodes.NODE_CLASS_MAPPINGS["DRaFTTrainLoRA"].__module__].NODE_CLASS_MAPPINGS


def test_every_node_has_a_help_page_naming_its_inputs_and_outputs(comfyui):
    nodes = pack_nodes(comfyui)
    titles = sys.modules[nodes["DRaFTTrainLoRA"].__module__].NODE_DISPLAY_NAME_MAPPINGS
    assert sorted(p.stem for p in HELP.glob("*.md")) == sorted(nodes)  # one page per node, none for a node gone
    for name, cls in nodes.items():
        text = (HELP / f"{name}.md").read_text()
        assert text.startswith(f"# {titles[name]}\n"), name
        assert [s for s in HELP_SECTIONS if s not in text] == [], name
        spec = cls.INPUT_TYPES()
        inputs = [k for group in ("required", "optional") for k in spec.get(group, {})]
        missing = [k for k in inputs + output_names(cls) if f"`{k}`" not in text]
        assert not missing, f"{name}.md does not name {missing}"


def test_every_input_of_every_node_has_a_tooltip(comfyui):
    missing = [f"{name}.{key}" for name, cls in pack_nodes(comfyui).items()
               for group in ("required", "optional") for key, spec in cls.INPUT_TYPES().get(group, {}).items()
               if not (len(spec) > 1 and spec[1].get("tooltip"))]
    assert not missing, missing


def test_advanced_settings_live_on_the_options_node_with_the_trainers_defaults(comfyui):
    from comfy_draft.trainer import TrainConfig

    nodes = pack_nodes(comfyui)
    module = sys.modules[nodes["DRaFTTrainLoRA"].__module__]
    moved = set(nodes["DRaFTTrainingOptions"].INPUT_TYPES()["required"])
    assert moved == {"precision", "accumulation", "gradient_checkpointing", "lv_samples", "k", "kl_coef", "reward_resolution",
                     "save_every"}
    trainer_widgets = [name for name, _ in widget_names(nodes["DRaFTTrainLoRA"])]
    assert not moved & set(trainer_widgets) and len(trainer_widgets) <= 15, trainer_widgets
    d = TrainConfig(prompts=[""])
    defaults = module.training_options(None)  # no options node connected: TrainConfig's own defaults
    assert defaults == {"precision": d.precision, "accumulation": d.accumulation, "gradient_checkpointing": d.gradient_checkpointing,
                        "lv_samples": d.lv_samples, "k": d.grad_steps, "kl_coef": d.kl_coef,
                        "reward_resolution": d.reward_resolution, "save_every": d.save_every,
                        "inner_epochs": d.inner_epochs, "graft_samples_per_prompt": d.samples_per_prompt,
                        "graft_accepted_per_prompt": d.accepted_per_prompt, "pgraft_fraction": d.pgraft_fraction,
                        "ddpo_timestep_fraction": d.timestep_fraction, "ddpo_clip_range": d.clip_range,
                        "ddpo_adv_clip_max": d.adv_clip_max}
    widgets = {name: spec[1]["default"] for group in ("required", "optional")
               for name, spec in nodes["DRaFTTrainingOptions"].INPUT_TYPES()[group].items()}
    assert training_options()["inputs"] == {k: widgets[k] for k in moved}  # the tests' and examples' options node
    (built,) = nodes["DRaFTTrainingOptions"]().build(**dict(widgets, kl_coef=3.0, gradient_checkpointing="off"))
    assert module.training_options(built) == dict(defaults, kl_coef=3.0, gradient_checkpointing=False)
