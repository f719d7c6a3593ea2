"""The embedded toy world: procedural scenes of coloured shapes, their renderer, and a
rule-based checker (a small GenEval) that scores generated images against prompts."""
