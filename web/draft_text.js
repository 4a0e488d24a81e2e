// ComfyUI-DRaFT frontend: show the text that DRaFT nodes put in their UI output.
//
// ComfyUI shows images from a node's UI output but not arbitrary text, so DRaFT Evaluate (the
// mean and per-image rewards) and DRaFT Save LoRA (where the file went) get a read-only text box
// that onExecuted(message) fills with message.text. (The trainer shows its text under its reward
// chart, see draft_chart.js.)
import { app } from "../../scripts/app.js";

const TEXT_NODES = new Set(["DRaFTEvaluate", "DRaFTSaveLoRA"]);
const TEXT_WIDGET = "draft_output";

function addTextWidget(node, placeholder) {
  const el = document.createElement("textarea");
  el.className = "comfy-multiline-input draft-output-text";
  el.readOnly = true;
  el.placeholder = placeholder;
  el.spellcheck = false;
  el.style.opacity = "0.85";
  el.style.fontFamily = "monospace";
  const widget = node.addDOMWidget(TEXT_WIDGET, "draft_text", el, {
    getValue: () => el.value,
    setValue: (v) => { el.value = v ?? ""; },
    getMinHeight: () => 56,
    getMaxHeight: () => 220,
    serialize: false, // not sent in the prompt
  });
  widget.serialize = false; // not saved in the workflow's widgets_values
  // Let the wheel scroll the canvas unless the text itself can scroll.
  el.addEventListener("wheel", (e) => {
    if (el.scrollHeight <= el.clientHeight && !e.ctrlKey) {
      e.preventDefault();
      app.canvas?.processMouseWheel?.(e);
    }
  }, { passive: false });
  return widget;
}

app.registerExtension({
  name: "DRaFT.OutputText",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TEXT_NODES.has(nodeData?.name)) return;
    const placeholder = nodeData.name === "DRaFTEvaluate"
      ? "Rewards appear here after the workflow runs."
      : "The saved file appears here after the workflow runs.";

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      addTextWidget(this, placeholder);
      const min = this.computeSize();
      this.setSize([Math.max(this.size[0], min[0]), Math.max(this.size[1], min[1])]);
      return r;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const text = message?.text;
      const widget = this.widgets?.find((w) => w.name === TEXT_WIDGET);
      if (widget && text != null) {
        widget.value = Array.isArray(text) ? text.join("\n") : String(text);
        this.setDirtyCanvas?.(true, false);
      }
      return r;
    };
  },
});
