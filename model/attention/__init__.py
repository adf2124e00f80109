"""The denoising UNet's added attentions (SynchroRaMa section 3.2), each a diffusers attention processor:
reference, temporal, and audio/emotion/description condition attention."""
