"""Texture: preferred-orientation corrections of the per-lineout refinement, per-reflection
intensities and pole figures from (ω, η) lineouts, and the joint spherical-harmonics texture fit
(``docs/texture.md``; the model in ``docs/reference/texture_model.md``)."""
