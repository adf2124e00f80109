"""Generation: a reference image and a driving audio to a talking-face video with a trained checkpoint."""
