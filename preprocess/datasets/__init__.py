"""Dataset readers: the candidate clips of HDTF (annotation files), VFHQ (meta-info files), MEAD (subject folders)
or any folder of videos, each with its reasons for the candidates it rejects; ``download`` fetches HDTF."""
