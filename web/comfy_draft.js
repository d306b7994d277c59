// comfy-draft canvas extension. For now it only marks the pack's nodes; the live reward chart of the
// trainer node will hang off custom "comfy_draft.*" websocket events.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "comfy_draft",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.category === "DRaFT" && !nodeType.prototype.color) {
      nodeType.prototype.color = "#2a3a4a";
    }
  },
});
