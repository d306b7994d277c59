// comfy-draft canvas extension: a live training chart on DRaFTTrainLoRA (from the node's
// "comfy_draft.train_step" websocket events, replayed from /comfy_draft/history after a reload) and the text
// (`ui.text`) that the pack's nodes return, shown on the node. Without this extension the pack still works: the
// trainer's IMAGE output carries the curve.
//
// ComfyUI loads every .js under web/ into one page shared with every other pack, so this file touches only what is
// its own: the extension and widget type names are under the pack's namespace (its DisplayName, as `comfy-test lint`
// requires), the chart lives in a shadow root with its stylesheets (uPlot's and web/comfy_draft.css), and nothing
// is added to the document's head or styled outside the chart.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";
// uPlot 1.6.32 (MIT, Leon Sorokin), vendored from npm into vendor/uplot/ (ES module build: ComfyUI imports
// every .js under web/ as a module, so this file is loaded once, from the same URL).
import uPlot from "./vendor/uplot/uPlot.esm.js";

// The folder ComfyUI serves web/ from (/extensions/<pack>/comfy_draft.js) is the one it names the pack's nodes'
// python_module after ("custom_nodes.<pack>"); as the frontend does, a "@version" suffix is not part of the name.
const packId = (name) => name?.split("@")[0];
const PACK = packId(decodeURIComponent(new URL(import.meta.url).pathname.split("/").at(-2)));
const isPackNode = (nodeData) => {
  const [root, pack] = nodeData?.python_module?.split(".") ?? [];
  return root === "custom_nodes" && packId(pack) === PACK;
};

// The chart's stylesheets, loaded inside its shadow root only.
const STYLESHEETS = ["./vendor/uplot/uPlot.min.css", "./comfy_draft.css"].map((p) => new URL(p, import.meta.url).href);

const PLOT_HEIGHT = 140;
const COLOURS = ["#4a90e2", "#f0ad4e", "#b366ff", "#5cb85c", "#5bc0de", "#e0e0e0"];
const MIN_WIDTH = 420;  // node width that fits the panels' axes and legends
const AXIS = { stroke: "#bbb", grid: { stroke: "#ffffff1a" }, ticks: { stroke: "#ffffff33" }, font: "10px sans-serif" };

// Legend values: uPlot's default rounds to 3 decimals, which shows small gradients and KL as 0.
const fmt = (v) => (v == null ? "--" : v !== 0 && Math.abs(v) < 1e-3 ? v.toExponential(2) : String(+v.toPrecision(4)));

// Tick labels with as many digits as the tick spacing needs, so that close ticks (a reward moving in its
// fourth digit) keep distinct labels.
function tickLabels(u, ticks, axisIdx, space, incr) {
  const largest = Math.max(...ticks.map(Math.abs));
  const step = Math.floor(Math.log10(incr));
  if (largest !== 0 && largest < 1e-3) return ticks.map((v) => v.toExponential(Math.max(1, Math.floor(Math.log10(largest)) - step)));
  return ticks.map((v) => v.toFixed(Math.min(12, Math.max(0, -step))));
}

// A y axis as wide as its longest tick label (small gradients and KL have long ones).
function axisSize(u, values, axisIdx, cycleNum) {
  const axis = u.axes[axisIdx];
  if (cycleNum > 1) return axis._size;
  u.ctx.font = axis.font[0];
  const longest = Math.max(0, ...(values ?? []).map((v) => u.ctx.measureText(v).width));
  return Math.ceil(axis.ticks.size + axis.gap + longest / uPlot.pxRatio) + 4;
}

const label = (key) => key.replace("val_", "held-out ").replaceAll("_", " ");
const column = (steps, key) => steps.map((m) => (Number.isFinite(m[key]) ? m[key] : null));

// The chart's panels ([title, metric keys]) and its smoothed reward come with each step from the server
// (`panels` and `reward_smoothed`: comfy_draft/plotting.py's, as the trainer's reward_curve image draws them).
function panelsOf(steps) {
  const present = (key) => steps.some((m) => key in m);
  return (steps.at(-1)?.panels ?? [])
    .map(([title, keys]) => [title, keys.filter(present)])
    .filter(([, keys]) => keys.length);
}

// uPlot series and data columns of one panel (x: the step).
function panelData(keys, chart) {
  const { steps, diversity_floor: floor } = chart;
  const series = [{ label: "step" }], data = [steps.map((m) => m.step)];
  keys.forEach((key, i) => {
    const values = column(steps, key), colour = COLOURS[i % COLOURS.length];
    if (key === "reward") {
      const dots = { show: true, size: 4 };
      series.push({ label: "reward (per step)", stroke: colour + "88", paths: () => null, points: dots });
      series.push({ label: "reward (smoothed)", stroke: colour, width: 2 });
      data.push(values, column(steps, "reward_smoothed"));
    } else {
      const validated = key.startsWith("val_");  // every few steps: points joined across the gaps
      series.push({ label: label(key), stroke: colour, spanGaps: validated, points: { show: validated, size: 6 } });
      data.push(values);
    }
  });
  if (keys.includes("val_diversity") && floor > 0) {
    series.push({ label: "diversity floor", stroke: "#d9534f", dash: [6, 4], points: { show: false } });
    data.push(steps.map(() => floor));
  }
  return { series, data };
}

// A dotted line at the kept step (the best validated LoRA, or the last), once the node reports it.
const keptStepLine = (chartData) => ({
  hooks: {
    draw: [(u) => {
      const chart = chartData();
      if (chart.kept_step == null) return;
      const x = Math.round(u.valToPos(chart.kept_step, "x", true));
      const { ctx, bbox } = u;
      ctx.save();
      ctx.strokeStyle = "#eee";
      ctx.setLineDash([2, 3]);
      ctx.beginPath();
      ctx.moveTo(x, bbox.top);
      ctx.lineTo(x, bbox.top + bbox.height);
      ctx.stroke();
      ctx.fillStyle = "#eee";
      ctx.font = `${10 * uPlot.pxRatio}px sans-serif`;
      ctx.textAlign = "right";
      ctx.fillText("kept", x - 3 * uPlot.pxRatio, bbox.top + 10 * uPlot.pxRatio);
      ctx.restore();
    }],
  },
});

class TrainingChart {
  constructor(node) {
    this.node = node;
    this.chart = { steps: [], total: 0, diversity_floor: 0, kept_step: null };
    this.plots = [];
    // The widget's element hosts a shadow root: uPlot's stylesheet and the chart's own apply inside it only.
    this.element = document.createElement("div");
    this.element.className = "comfy-draft-chart";
    const root = this.element.attachShadow({ mode: "open" });
    const styled = STYLESHEETS.map((href) => new Promise((loaded) => {
      root.append(Object.assign(document.createElement("link"), { rel: "stylesheet", href, onload: loaded,
                                                                  onerror: loaded }));
    }));
    this.content = document.createElement("div");  // natural height: the widget's minimum
    this.content.className = "comfy-draft-chart-content";
    root.append(this.content);
    this.styled = false;  // plots are made once the stylesheets apply (uPlot measures its layout when made)
    Promise.all(styled).then(() => {
      this.styled = true;
      this.render();
    });
    this.render();
    new ResizeObserver(() => this.plots.forEach((u) => u.setSize({ width: this.width(), height: PLOT_HEIGHT })))
      .observe(this.element);
  }

  width() {
    return Math.max(200, this.element.clientWidth || this.node.size[0] - 20);
  }

  // The run's chart data (from the history route), unless the live events already hold as much.
  replay(chart) {
    if (chart && chart.steps.length >= this.chart.steps.length) this.set(chart);
  }

  set(chart) {
    this.chart = { ...this.chart, ...chart };
    this.render();
  }

  addStep(metrics) {
    const last = this.chart.steps.at(-1);
    const steps = last && metrics.step > last.step ? [...this.chart.steps, metrics] : [metrics];  // a new run
    this.set({ steps, total: metrics.total, diversity_floor: metrics.diversity_floor ?? 0,
               kept_step: steps.length > 1 ? this.chart.kept_step : null });
  }

  render() {
    const { steps } = this.chart;
    if (!steps.length || !this.styled) {
      this.clear();
      this.content.textContent = `training chart: ${steps.length ? "loading" : "waiting for training steps"}`;
      this.content.classList.add("comfy-draft-chart-waiting");
      return;
    }
    const panels = this.panels = panelsOf(steps);
    const shape = JSON.stringify([panels, this.chart.diversity_floor > 0]);
    if (shape === this.shape) {
      panels.forEach(([, keys], i) => this.plots[i].setData(panelData(keys, this.chart).data));
      this.fit();
      return;
    }
    this.clear();
    this.shape = shape;
    this.content.classList.remove("comfy-draft-chart-waiting");
    const first = steps[0].step, chart = this.chart;
    this.plots = panels.map(([title, keys]) => {
      const { series, data } = panelData(keys, chart);
      series.slice(1).forEach((s) => (s.value = (u, v) => fmt(v)));
      return new uPlot({
        title, width: this.width(), height: PLOT_HEIGHT, series, plugins: [keptStepLine(() => this.chart)],
        // the x axis spans the whole run, so the chart also shows how far it has got
        scales: { x: { time: false, range: () => [first, Math.max(this.chart.total, first + 1)] } },
        axes: [{ ...AXIS }, { ...AXIS, size: axisSize, space: 24, values: tickLabels }],
        cursor: { sync: { key: `comfy_draft_${this.node.id}` } },
        legend: { live: true },
      }, data, this.content);
    });
    this.fit();
  }

  // Room for the panels and legends: grow the node when they (or the sample preview below) need it.
  fit() {
    requestAnimationFrame(() => {
      const height = this.node.computeSize()[1];
      const [width, current] = this.node.size;
      if (current < height || width < MIN_WIDTH) {
        this.node.setSize([Math.max(width, MIN_WIDTH), Math.max(current, height)]);
      }
      this.node.setDirtyCanvas(true, true);
    });
  }

  clear() {
    this.plots.forEach((u) => u.destroy());
    this.plots = [];
    this.shape = null;
    this.content.textContent = "";
  }
}

async function fetchHistory() {
  try {
    return await (await api.fetchApi("/comfy_draft/history")).json();
  } catch {
    return {};  // an older server without the route: live events only
  }
}

// The text a node of the pack returns in `ui.text` (scores, sweep tables, the trainer's summary), in a read-only box.
function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === TEXT_WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, TEXT_WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.label = "result";
    widget.inputEl.readOnly = true;
    widget.serialize = false;
  }
  widget.value = text;
}

// DRaFTTrainLoRA's widgets in workflows saved before its advanced settings moved to the DRaFT Training Options node:
// a record of that saved format (the frontend restores widget values by position), and the settings of it renamed
// since, with how their old values read now. Such a workflow is recognised by its values (numbers from k to seed,
// then the seed's control value, save_every and lora_name); the values are restored by name, and those that are
// inputs of DRaFTTrainingOptions, as its node definition names them, go to an options node created beside it.
const OLD_TRAINER_WIDGETS = ["prompts", "negative_prompt", "variant", "k", "lv_samples", "training_steps",
  "sampling_steps", "cfg", "width", "height", "batch_size", "learning_rate", "rank", "seed", "control_after_generate",
  "save_every", "lora_name", "resume_lora", "resume_state", "kl_coef", "reward_resolution", "precision",
  "accumulation", "checkpointing"];
const RENAMED = {
  // a boolean before it gained "auto" and "blocks"
  checkpointing: ["gradient_checkpointing", (v) => (typeof v === "boolean" ? (v ? "on" : "off") : v)],
};
let optionInputs = new Set();  // DRaFTTrainingOptions's inputs, from its node definition (beforeRegisterNodeDef)

function oldTrainerValues(values) {
  const old = Array.isArray(values) && values.length >= 17 && values.length <= OLD_TRAINER_WIDGETS.length
    && values.slice(3, 14).every((v) => typeof v === "number")
    && typeof values[14] === "string" && typeof values[15] === "number" && typeof values[16] === "string";
  if (!old) return null;
  return Object.fromEntries(values.map((v, i) => {
    const [name, convert] = RENAMED[OLD_TRAINER_WIDGETS[i]] ?? [OLD_TRAINER_WIDGETS[i], (x) => x];
    return [name, convert(v)];
  }));
}

function addMovedOptions(trainer, moved) {
  const options = LiteGraph.createNode("DRaFTTrainingOptions");
  app.graph.add(options);
  options.pos = [trainer.pos[0] - options.size[0] - 40, trainer.pos[1]];
  for (const widget of options.widgets ?? []) {
    if (widget.name in moved) widget.value = moved[widget.name];
  }
  options.connect(0, trainer, trainer.findInputSlot("options"));
}

const chartOf = (id) => (app.graph.getNodeById(Number(id)) ?? app.graph.getNodeById(id))?.draftChart;

// Names under the pack's namespace: its DisplayName ("comfy-draft: DRaFT reward fine-tuning" in pyproject.toml),
// lowercased to letters and digits.
const TEXT_WIDGET = "comfydraftdraftrewardfinetuning_text";
const CHART_WIDGET = "comfydraftdraftrewardfinetuning_chart";

app.registerExtension({
  name: "comfydraftdraftrewardfinetuning.canvas",
  setup() {
    api.addEventListener("comfy_draft.train_step", ({ detail }) => chartOf(detail.node)?.addStep(detail));
  },
  // After the whole graph is configured: an old workflow's moved settings, on a new options node.
  loadedGraphNode(node) {
    if (!node.movedOptions) return;
    const moved = node.movedOptions;
    delete node.movedOptions;
    if (node.inputs?.find((i) => i.name === "options")?.link == null) addMovedOptions(node, moved);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isPackNode(nodeData)) return;
    if (nodeData.name === "DRaFTTrainingOptions") {
      optionInputs = new Set(Object.keys({ ...nodeData.input?.required, ...nodeData.input?.optional }));
    }
    if (nodeData.name === "DRaFTTrainLoRA") {
      const configure = nodeType.prototype.configure;
      nodeType.prototype.configure = function (info) {
        const old = oldTrainerValues(info?.widgets_values);
        if (old) {
          const values = this.widgets.filter((w) => w.serialize !== false)
            .map((w) => (w.name in old ? old[w.name] : w.value));
          info = { ...info, widgets_values: values };
          this.movedOptions = Object.fromEntries(Object.entries(old).filter(([k]) => optionInputs.has(k)));
        }
        return configure.call(this, info);
      };
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        onNodeCreated?.apply(this, arguments);
        this.draftChart = new TrainingChart(this);
        const content = this.draftChart.content;
        const element = this.draftChart.element;
        const chart = this.addDOMWidget(CHART_WIDGET, "comfydraftdraftrewardfinetuning.chart", element, {
          serialize: false,
          margin: 4,
          getMinHeight: () => Math.max(40, content.offsetHeight) + 2 * 4,  // the widget's margins inside
        });
        chart.label = "training chart";
        this.setSize(this.computeSize());
        // After a reload or when the workflow is reopened: the run's steps so far. Fetched after this
        // synchronous node creation, when a loaded workflow has given the node its id.
        fetchHistory().then((history) => this.draftChart.replay(history[String(this.id)]));
      };
      // The run's end: the kept step (and any steps whose events this page missed).
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        fetchHistory().then((history) => this.draftChart.replay(history[String(this.id)]));
      };
    }
    // Every node of the pack: the text it returns in `ui.text`, on the node.
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text) showText(this, message.text.join("\n"));
      this.setDirtyCanvas(true, true);
    };
  },
});
