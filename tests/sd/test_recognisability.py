"""Recognisability: each training prompt generated and judged; shares computed from the judges' words."""

import numpy as np

from dtrak_core.attribution.loading import load_model, load_training_set
from dtrak_core.evaluation.recognisability import judge_prompts
from dtrak_core.tasks.text_to_image import GuidanceSettings


class FixedJudge:
    """A stand-in judge: the same answer for every image (the shares are then known exactly)."""

    def __init__(self, answer: str) -> None:
        self.answer = answer

    def predict(self, images: np.ndarray) -> list[str]:
        assert images.ndim == 4 and images.dtype == np.uint8
        return [self.answer] * len(images)


def test_every_distinct_training_prompt_is_generated_with_each_seed_and_judged(sd_lora, tmp_path):
    rows = load_training_set(load_model(sd_lora))
    rows.metadata["subject"] = [text.split(",")[0] for text in rows.metadata["text"]]
    judged = judge_prompts(sd_lora, rows, "subject", "artist", [0, 1], GuidanceSettings(guidance_scale=2.0, steps=3),
                           (FixedJudge("a"), FixedJudge("red square")), tmp_path / "samples")
    prompts = list(dict.fromkeys(rows.metadata["text"]))
    assert judged.prompts == [p for p in prompts for _ in range(2)]
    assert judged.images.shape == (2 * len(prompts), 16, 16, 3)
    artists = [p.split(", ")[1].removesuffix(" style") for p in judged.prompts]
    assert judged.prompted_artist == artists
    assert judged.prompted_subject == [p.split(",")[0] for p in judged.prompts]
    assert judged.artist_share == np.mean(np.array(artists) == "a")
    assert judged.subject_share == np.mean(np.array(judged.prompted_subject) == "red square")
    # Seeds differ, and the same prompt and seed give the same image again (from the samples cache).
    assert not np.array_equal(judged.images[0], judged.images[1])
    again = judge_prompts(sd_lora, rows, "subject", "artist", [0, 1], GuidanceSettings(guidance_scale=2.0, steps=3),
                          (FixedJudge("a"), FixedJudge("x")), tmp_path / "samples")
    assert np.array_equal(again.images, judged.images)
