// comfy-draft canvas extension. Shows DRaFTScoreImages' scores on the node; the trainer's live reward
// chart will hang off custom "comfy_draft.*" websocket events.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

app.registerExtension({
  name: "comfy_draft",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "DRaFTScoreImages") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      let widget = this.widgets?.find((w) => w.name === "scores_text");
      if (!widget) {
        widget = ComfyWidgets.STRING(this, "scores_text", ["STRING", { multiline: true }], app).widget;
        widget.inputEl.readOnly = true;
        widget.serialize = false;
      }
      widget.value = (message?.text ?? []).join("\n");
      this.setDirtyCanvas(true, true);
    };
  },
});
