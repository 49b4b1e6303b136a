"""Talking heads inside the pipeline: live sessions on lipsync executor slots, the lip-sync pool, and
the persisted queue of offline render jobs."""
