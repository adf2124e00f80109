"""The video group (per candidate, CPU): probe, face survey, crop and standardise (with the face mesh and the
frame-quality measures on its one decode), speech activity, and the split into judged, cut pieces."""
