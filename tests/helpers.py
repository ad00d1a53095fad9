"""Helpers shared by the capture tests."""

import torch


def hook_state(model):
    """Every module's forward hooks and pre-hooks (with their kwargs flags) and backward hooks."""
    return {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._forward_hooks_with_kwargs),
                dict(m._forward_pre_hooks_with_kwargs), dict(m._backward_hooks))
            for n, m in model.named_modules()}


def torch_function_modes() -> int:
    """How many torch-function modes are active on this thread (0 outside any capture)."""
    return len(torch.overrides._get_current_function_mode_stack())
