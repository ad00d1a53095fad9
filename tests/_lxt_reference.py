"""lxt's CP-LRP on a torchvision ViT: run by tests/test_lrp.py in a subprocess (lxt patches
torchvision's classes for the whole process, with no undo).

Usage: python tests/_lxt_reference.py IN.pt OUT.pt
IN.pt holds the model's config (``cfg``), ``state``, the input ``x`` and the ``target`` classes;
OUT.pt gets the pixel relevance ``Σ_c x ⊙ ∂logit/∂x`` of lxt's efficient mode with its own rule
set for torchvision's ViT (``lxt.efficient.models.vit_torch.cp_LRP``: identity rule on LayerNorm
and GELU, attention probabilities constant, plain gradient on linear layers) and the logits.
"""

import sys
import types

import torch

# lxt 2.1's model map imports lxt.efficient.models.bert, which imports a helper transformers 5
# removed (find_pruneable_heads_and_indices); that module is not used here, so a stand-in
# takes its place (in this process only, never in vitviz)
_bert = types.ModuleType("lxt.efficient.models.bert")
_bert.modeling_bert = types.ModuleType("modeling_bert_stand_in")
_bert.attnLRP = {}
sys.modules["lxt.efficient.models.bert"] = _bert

import torchvision  # noqa: E402
from lxt.efficient import monkey_patch  # noqa: E402
from torchvision.models import vision_transformer  # noqa: E402


def main(src: str, dst: str) -> None:
    monkey_patch(vision_transformer)  # lxt's default map for this module: cp_LRP
    inp = torch.load(src, weights_only=True)
    model = torchvision.models.VisionTransformer(**inp["cfg"]).eval()
    model.load_state_dict(inp["state"])
    model = model.to(inp["x"].dtype)
    x = inp["x"].clone().requires_grad_(True)
    logits = model(x)
    logits.gather(1, inp["target"][:, None]).sum().backward()
    torch.save({"pixels": (x * x.grad).sum(1).detach(), "logits": logits.detach()}, dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
