"""Which emoji3 category should the text-to-image demo's LoRA learn? (docs/training.md)

For the training split of each category, in pixels (32 px, [0, 1]):
- cross-artist subject nearest neighbour: for each image, the nearest image drawn by *another*
  artist; the share that shows the same subject. High = a subject looks alike whoever draws it,
  so "<subject>, <artist> style" is a well-posed prompt and a subject judge can recognise it.
- artist nearest neighbour among other subjects: the share whose nearest image of another
  subject is by the same artist (how visible the styles are).

    python benchmarks/sd-demo/choose_lora_part.py > benchmarks/sd-demo/choose_lora_part.txt
"""

import numpy as np

from dtrak_core.datasets import load_image_folder
from dtrak_core.paths import emoji3_dir


def main() -> None:
    data = load_image_folder(emoji3_dir(), image_size=32)
    meta = data.metadata
    pixels = data.images.reshape(len(data), -1).astype(np.float32) / 255
    print("category | train images | subjects | cross-artist subject NN | chance | artist NN (other subjects)")
    for category in sorted(set(meta.category)):
        rows = np.flatnonzero(((meta.category == category) & (meta.split == "train")).to_numpy())
        x, subject, artist = pixels[rows], meta.codepoint.to_numpy()[rows], meta.artist.to_numpy()[rows]
        distance = ((x[:, None] - x[None]) ** 2).sum(-1)
        other_artist = np.where(artist[:, None] == artist[None], np.inf, distance)
        other_subject = np.where(subject[:, None] == subject[None], np.inf, distance)
        print(f"{category} | {len(rows)} | {len(set(subject))} | "
              f"{np.mean(subject[other_artist.argmin(1)] == subject):.3f} | {1 / len(set(subject)):.3f} | "
              f"{np.mean(artist[other_subject.argmin(1)] == artist):.3f}")


if __name__ == "__main__":
    main()
