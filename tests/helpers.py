"""Helpers shared by several test files: hook and mode state, tiny models, inputs."""

import torch


def hook_state(model):
    """Every module's forward hooks and pre-hooks (with their kwargs flags) and backward hooks."""
    return {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._forward_hooks_with_kwargs),
                dict(m._forward_pre_hooks_with_kwargs), dict(m._backward_hooks))
            for n, m in model.named_modules()}


def torch_function_modes() -> int:
    """How many torch-function modes are active on this thread (0 outside any capture)."""
    return len(torch.overrides._get_current_function_mode_stack())


def tiny_hf():
    """A tiny transformers ViT classifier (random weights): 32 px, 8 px patches, 5 classes."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, image_size=32, patch_size=8, num_labels=5)
    return transformers.ViTForImageClassification(cfg).eval()


def inputs(b=3, seed=1):
    """``[b, 3, 32, 32]`` seeded random images."""
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
