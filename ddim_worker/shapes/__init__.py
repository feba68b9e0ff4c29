"""The shapes model: a small latent-diffusion model in Stable Diffusion 1.x's diffusers format, trained here on
64 x 64 scenes of one coloured shape on a plain background, shipped in the repository (``weights/``).

``make_shapes_model(path)`` writes it as a ``StableDiffusionPipeline`` folder; ``scenes`` draws the scenes, their
captions and masks; ``train`` trains it; ``sample`` is text-to-image; ``edit_bench`` measures edits (``edit_kinds``
says how colour, shape and background edits are judged; ``job_bench`` runs them through ``ddim-edit run``).
"""



def make_shapes_model(path):  # noqa: D103 - lazy, so that importing the package loads no torch
    from ddim_worker.shapes.model import make_shapes_model as make

    return make(path)
