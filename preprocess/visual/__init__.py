"""The visual group (per kept piece): facial action units, the vision-language description, its CLIP text
embedding and the SD VAE latents (SynchroRaMa section 3.1)."""
