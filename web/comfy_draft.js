// comfy-draft canvas extension: a live reward chart on DRaFTTrainLoRA (from the node's
// "comfy_draft.train_step" websocket events) and the scores text on DRaFTScoreImages.
// Without this extension the pack still works: the trainer's IMAGE output carries the curve.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const CHART_HEIGHT = 200;
const SERIES = [
  ["reward", "#4a90e2"],
  ["loss", "#e2733a"],
  ["grad_norm", "#5cb85c"],
];
// Held-out validation metrics (val_reward, val_<judge>, val_diversity, ...) arrive every few steps.
const VALIDATION_COLOURS = ["#d9534f", "#f0ad4e", "#b366ff", "#5bc0de", "#e0e0e0"];

function seriesOf(history) {
  const keys = new Set();
  history.forEach((m) => Object.keys(m).forEach((k) => k.startsWith("val_") && keys.add(k)));
  return SERIES.concat([...keys].sort().map((k, i) => [k, VALIDATION_COLOURS[i % VALIDATION_COLOURS.length]]));
}

function drawChart(ctx, history, width, top) {
  const pad = 10, x0 = pad, y0 = top + 30, w = width - 2 * pad, h = CHART_HEIGHT - 38;
  ctx.save();
  ctx.fillStyle = "#1e1e1e";
  ctx.fillRect(x0, y0, w, h);
  ctx.strokeStyle = "#555";
  ctx.strokeRect(x0, y0, w, h);
  ctx.font = "11px sans-serif";
  if (!history?.length) {
    ctx.fillStyle = "#888";
    ctx.fillText("reward chart: waiting for training steps", x0 + 8, y0 + h / 2);
    ctx.restore();
    return;
  }
  const last = history[history.length - 1];
  const total = Math.max(2, last.total ?? last.step);
  const series = seriesOf(history);
  series.forEach(([key, colour], i) => {
    const points = history.filter((m) => Number.isFinite(m[key]));
    if (!points.length) return;
    const values = points.map((m) => m[key]);
    const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
    ctx.strokeStyle = ctx.fillStyle = colour;
    ctx.lineWidth = key === "reward" ? 2 : 1;
    ctx.beginPath();
    points.forEach((m, j) => {
      const x = x0 + (w * (m.step - 1)) / (total - 1);
      const y = y0 + h - (h * (m[key] - lo)) / span;
      j ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
      if (key.startsWith("val_")) ctx.fillRect(x - 2, y - 2, 4, 4);
    });
    ctx.stroke();
    const label = `${key} ${Number(values[values.length - 1]).toPrecision(4)}`;
    ctx.fillText(label, x0 + (i % 4) * (w / 4), top + 12 + 13 * Math.floor(i / 4));
  });
  ctx.fillStyle = "#aaa";
  ctx.fillText(`step ${last.step}/${last.total}`, x0 + w - 80, y0 + h - 5);
  ctx.restore();
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

app.registerExtension({
  name: "comfy_draft",
  setup() {
    api.addEventListener("comfy_draft.train_step", ({ detail }) => {
      const node = app.graph.getNodeById(Number(detail.node)) ?? app.graph.getNodeById(detail.node);
      if (!node) return;
      if (detail.step === 1 || !node.draftHistory) node.draftHistory = [];
      node.draftHistory.push(detail);
      node.setDirtyCanvas(true, true);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "DRaFTTrainLoRA") {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        onNodeCreated?.apply(this, arguments);
        // A canvas-drawn widget, so the node's layout reserves the chart's space.
        this.addCustomWidget({
          name: "reward_chart",
          type: "comfy_draft.chart",
          serialize: false,
          draw: (ctx, node, width, y) => drawChart(ctx, node.draftHistory, width, y),
          computeSize: (width) => [width, CHART_HEIGHT],
        });
        this.setSize(this.computeSize());
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
