"""The editing core: schedule and sampler, the model adapter, the plan and its executor, the methods (inversion,
attention control, trajectory guides, masks, null-text, token alignment). No Ray, no storage, no job: the
layers above (the row schema, keys and config; the job) use it, never the other way round."""
