"""ComfyUI nodes of ComfyUI-DRaFT (V3 node API; ComfyUI >= 0.3.64). Thin glue over the engine in
``training/`` and the rewards in ``reward_models/``."""
from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from . import (evaluate_node, experts_node, guidance_node, heldout_check_node, lora_settings_node,
               memory_options_node, optimizer_node, reward_model_nodes, reward_nodes, routes,
               sampler_node, save_lora_node, save_preview_node, trainer_node, video_settings_node)


class DraftExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            sampler_node.DraftSamplerNode,
            memory_options_node.DraftMemoryOptions,
            trainer_node.DraftTrainerNode,
            lora_settings_node.DraftLoRASettings,
            optimizer_node.DraftOptimizer,
            save_preview_node.DraftSavePreview,
            save_lora_node.DraftSaveLoRA,
            evaluate_node.DraftEvaluate,
            guidance_node.DraftGuidanceNode,
            heldout_check_node.DraftHeldoutCheck,
            video_settings_node.DraftVideoSettings,
            experts_node.DraftWan22Experts,
            *reward_nodes.NODES,
            *reward_model_nodes.NODES,
        ]


async def comfy_entrypoint() -> DraftExtension:
    routes.register()
    reward_model_nodes.register_folder()
    return DraftExtension()
