// comfy-draft canvas extension: a live training chart on DRaFTTrainLoRA (from the node's
// "comfy_draft.train_step" websocket events, replayed from /comfy_draft/history after a reload) and the
// scores text on DRaFTScoreImages. Without this extension the pack still works: the trainer's IMAGE output
// carries the curve.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";
// uPlot 1.6.32 (MIT, Leon Sorokin), vendored from npm into lib/uplot/ (ES module build: ComfyUI imports
// every .js under web/ as a module, so this file is loaded once, from the same URL).
import uPlot from "./lib/uplot/uPlot.esm.js";

const css = document.createElement("link");
css.rel = "stylesheet";
css.href = new URL("./lib/uplot/uPlot.min.css", import.meta.url).href;
const style = document.createElement("style");
style.textContent = `.comfy-draft-chart .u-title { font-size: 12px; font-weight: normal; }
.comfy-draft-chart .u-legend { font-size: 11px; }`;
document.head.append(css, style);

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

// The panels with data: [title, metric keys], as comfy_draft/plotting.py's curve_panels.
function panelsOf(steps) {
  const val = [...new Set(steps.flatMap((m) => Object.keys(m).filter((k) => k.startsWith("val_"))))].sort();
  const panels = [
    ["reward", ["reward", ...val.filter((k) => k === "val_reward")]],
    ["judges (held-out)", val.filter((k) => k !== "val_reward" && !k.includes("diversity"))],
    ["diversity (held-out)", val.filter((k) => k.includes("diversity"))],
    ["gradient norm / KL", steps.some((m) => m.kl) ? ["grad_norm", "kl"] : ["grad_norm"]],
  ];
  return panels.filter(([, keys]) => keys.length);
}

// Exponential moving average, debiased at the start (as TensorBoard smooths; plotting.smoothed).
function smoothed(values, weight = 0.8) {
  let average = 0, i = 0;
  return values.map((v) => {
    if (v == null) return null;
    average = weight * average + (1 - weight) * v;
    return average / (1 - weight ** ++i);
  });
}

const label = (key) => key.replace("val_", "held-out ").replaceAll("_", " ");
const column = (steps, key) => steps.map((m) => (Number.isFinite(m[key]) ? m[key] : null));

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
      data.push(values, smoothed(values));
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
    this.element = document.createElement("div");
    this.element.className = "comfy-draft-chart";
    this.element.style.cssText = "overflow:hidden;background:#1e1e1e;color:#ddd;font:11px sans-serif;";
    this.content = document.createElement("div");  // natural height: the widget's minimum
    this.element.append(this.content);
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
    if (!steps.length) {
      this.clear();
      this.content.textContent = "training chart: waiting for training steps";
      this.content.style.padding = "8px";
      return;
    }
    const panels = panelsOf(steps);
    const shape = JSON.stringify([panels, this.chart.diversity_floor > 0]);
    if (shape === this.shape) {
      panels.forEach(([, keys], i) => this.plots[i].setData(panelData(keys, this.chart).data));
      this.fit();
      return;
    }
    this.clear();
    this.shape = shape;
    this.content.style.padding = "0";
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

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === "result_text");
  if (!widget) {
    widget = ComfyWidgets.STRING(node, "result_text", ["STRING", { multiline: true }], app).widget;
    widget.inputEl.readOnly = true;
    widget.serialize = false;
  }
  widget.value = text;
}

// DRaFTTrainLoRA's widgets before its advanced settings moved to the DRaFT Training Options node. The frontend
// restores widget values by position, so a workflow saved then is recognised by its values (numbers from k to
// seed, then the seed's control value, save_every and lora_name) and its values are restored by name; the moved
// ones go to an options node created beside the trainer.
const OLD_TRAINER_WIDGETS = ["prompts", "negative_prompt", "variant", "k", "lv_samples", "training_steps",
  "sampling_steps", "cfg", "width", "height", "batch_size", "learning_rate", "rank", "seed", "control_after_generate",
  "save_every", "lora_name", "resume_lora", "resume_state", "kl_coef", "reward_resolution", "precision",
  "accumulation", "checkpointing"];
const MOVED_TO_OPTIONS = ["k", "lv_samples", "save_every", "kl_coef", "reward_resolution", "precision",
  "accumulation", "checkpointing"];

function oldTrainerValues(values) {
  const old = Array.isArray(values) && values.length >= 17 && values.length <= OLD_TRAINER_WIDGETS.length
    && values.slice(3, 14).every((v) => typeof v === "number")
    && typeof values[14] === "string" && typeof values[15] === "number" && typeof values[16] === "string";
  return old ? Object.fromEntries(values.map((v, i) => [OLD_TRAINER_WIDGETS[i], v])) : null;
}

function addMovedOptions(trainer, moved) {
  const options = LiteGraph.createNode("DRaFTTrainingOptions");
  app.graph.add(options);
  options.pos = [trainer.pos[0] - options.size[0] - 40, trainer.pos[1]];
  for (const widget of options.widgets ?? []) {
    if (!(widget.name in moved)) continue;
    const value = moved[widget.name];
    // checkpointing was a boolean before it gained "auto" and "blocks"
    widget.value = widget.name === "checkpointing" && typeof value === "boolean" ? (value ? "on" : "off") : value;
  }
  options.connect(0, trainer, trainer.findInputSlot("options"));
}

const chartOf = (id) => (app.graph.getNodeById(Number(id)) ?? app.graph.getNodeById(id))?.draftChart;

app.registerExtension({
  name: "comfy_draft",
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
    if (nodeData.name === "DRaFTTrainLoRA") {
      const configure = nodeType.prototype.configure;
      nodeType.prototype.configure = function (info) {
        const old = oldTrainerValues(info?.widgets_values);
        if (old) {
          const values = this.widgets.filter((w) => w.serialize !== false)
            .map((w) => (w.name in old ? old[w.name] : w.value));
          info = { ...info, widgets_values: values };
          this.movedOptions = Object.fromEntries(MOVED_TO_OPTIONS.filter((k) => k in old).map((k) => [k, old[k]]));
        }
        return configure.call(this, info);
      };
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        onNodeCreated?.apply(this, arguments);
        this.draftChart = new TrainingChart(this);
        const content = this.draftChart.content;
        this.addDOMWidget("training_chart", "comfy_draft.chart", this.draftChart.element, {
          serialize: false,
          margin: 4,
          getMinHeight: () => Math.max(40, content.offsetHeight) + 2 * 4,  // the widget's margins inside
        });
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
    if (["DRaFTScoreImages", "DRaFTTrainLoRA", "DRaFTLoRAStrengthSweep"].includes(nodeData.name)) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        if (message?.text) showText(this, message.text.join("\n"));
        this.setDirtyCanvas(true, true);
      };
    }
  },
});
