"""Small real worlds the whole method runs on end to end on a laptop (the main job's default)."""
