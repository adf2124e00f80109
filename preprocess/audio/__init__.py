"""The audio group (per kept piece): the sync check, vocal separation, transcription, text and speech emotion,
valence-arousal and wav2vec 2.0 features (SynchroRaMa section 3.1)."""
