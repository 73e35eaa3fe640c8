"""fewstep: few-step diffusion sampling."""
