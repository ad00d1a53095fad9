# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Your first map, offline (notebook)
#
# The tutorial "Your first map, offline" as a notebook in percent format: open it in VS Code or
# PyCharm, or in Jupyter with jupytext (`jupytext --to notebook first_map.py`). It runs top to
# bottom offline on the bundled `shapes-vit` and shows vitviz's inline displays: attention maps,
# figures and the explorer page. The test suite runs it (`tests/test_docs_examples.py`).

# %%
import vitviz
from vitviz.render import panels
from vitviz.zoo import ASSETS

image = ASSETS / "shapes-triangle.png"  # a sample image shipped with vitviz
m = vitviz.load_model("shapes-vit")     # bundled: timm ViT, 64 px, 8 px patches, 4 layers x 4 heads
x = m.preprocess(image)                 # [1, 3, 64, 64]
m.layout

# %% [markdown]
# ## Capture
# Inside the `with` block vitviz reads the model's own attention calls. An `AttentionMaps` shows
# itself in a notebook as the CLS attention of every layer (rows) and head (columns).

# %%
with vitviz.capture(m) as rec:
    logits = m(x)
print("predicted:", m.labels[logits.argmax(-1).item()])
rec.attentions

# %% [markdown]
# ## Three maps, one figure
# Rollout (every layer, whatever the class), the CLS attention of the last layer (heads
# averaged) and the relevance of the predicted class (Chefer et al. 2021). All are `[1, 8, 8]`
# maps over the patch grid, not rescaled.

# %%
maps = {
    "rollout": vitviz.rollout(rec.attentions)[0],
    "CLS, last layer": vitviz.cls_maps(rec.attentions, layer=-1)[0].mean(0),
    "relevance": vitviz.relevance(m, x)[0],
}
fig, axes = panels(m.preprocessor.view(image), maps)
fig

# %% [markdown]
# ## Explore every patch, layer and head
# `vitviz.explore` builds a self-contained page; in a notebook it shows itself in an iframe.
# `.save("triangle.html")` writes it as one file that opens offline.

# %%
explorer = vitviz.explore(m, image)
explorer
