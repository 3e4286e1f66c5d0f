"""dtrak: which training images made this generated image? (Streamlit entry page.)

For now: the embedded emoji3 dataset and samples of the demo model. All work is done by
``dtrak_core``; this page only asks and shows.
"""

from __future__ import annotations

import streamlit as st
from PIL import Image

from dtrak_core.datasets import DatasetError, ImageFolderDataset, load_image_folder
from dtrak_core.datasets.emoji3 import ARTISTS, LICENCES
from dtrak_core.generation import SamplerConfig, generate_to_folder, image_grid
from dtrak_core.models import ModelError
from dtrak_core.paths import DEMO_MODEL_DIR, EMOJI3_DIR

SAMPLE_SEEDS = list(range(16))
SCALE = 4  # 32 px images shown at 128 px, nearest neighbour: crisp pixels, no blur.


@st.cache_resource(show_spinner="Loading the emoji3 dataset...")
def cached_dataset(path: str) -> ImageFolderDataset:
    return load_image_folder(path)


@st.cache_data(show_spinner="Sampling the demo model (DDIM, 50 steps)...")
def cached_samples(model_dir: str, seeds: tuple[int, ...]) -> list[Image.Image]:
    folder = generate_to_folder(model_dir, seeds, SamplerConfig(), progress=False)
    return [Image.open(folder / f"{s}.png").convert("RGB") for s in seeds]


def show_dataset(dataset: ImageFolderDataset) -> None:
    st.subheader("Training data: emoji3")
    counts = dataset.metadata.groupby(["artist", "split"]).size().unstack(fill_value=0)
    st.dataframe(counts, use_container_width=False)
    columns = st.columns(len(ARTISTS))
    for column, artist in zip(columns, ARTISTS):
        indices = dataset.where("artist", [artist])[:24]
        grid = image_grid([Image.fromarray(dataset.images[i]) for i in indices], columns=6, scale=3)
        column.image(grid, caption=f"{artist} ({len(dataset.where('artist', [artist]))} images)")


def show_samples() -> None:
    st.subheader("Samples of the demo model")
    if not (DEMO_MODEL_DIR / "model_index.json").exists():
        st.info(f"The demo model is not in {DEMO_MODEL_DIR}; train it with `make demo-model`.")
        return
    try:
        images = cached_samples(str(DEMO_MODEL_DIR), tuple(SAMPLE_SEEDS))
    except ModelError as error:
        st.error(str(error))
        return
    st.image(image_grid(images, columns=8, scale=SCALE),
             caption=f"seeds {SAMPLE_SEEDS[0]}-{SAMPLE_SEEDS[-1]}, DDIM 50 steps, eta 0")


def show_licences() -> None:
    st.subheader("Licences and attribution")
    for artist in ARTISTS:
        st.markdown(f"- **{artist}**: {LICENCES[artist]}")


def main() -> None:
    st.set_page_config(page_title="dtrak", layout="wide")
    st.title("dtrak: which training images made this image?")
    st.caption("Data attribution for diffusion models (D-TRAK). The attribution views arrive in "
               "the next release; this page shows the embedded data and model.")
    try:
        dataset = cached_dataset(str(EMOJI3_DIR))
    except DatasetError as error:
        st.error(f"{error}. Build the dataset with `make data`.")
        return
    show_dataset(dataset)
    show_samples()
    show_licences()


main()
