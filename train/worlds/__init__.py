"""Small real worlds the whole method runs on end to end on a laptop (the main job's default).

A world module gives: NAME, SIZE, TEXT_LENGTH, prompts(split), prompt_encoder(), flux_config(),
images(split), to_latents(images), to_images(latents), paired_prompts(prompts, labels, rng) and
teacher_path()."""

from train.worlds import digits

WORLDS = {digits.NAME: digits}
