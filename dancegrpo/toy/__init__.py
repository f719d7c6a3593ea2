"""The embedded toy world: procedural scenes of coloured shapes and a rule-based checker (a
small GenEval) that scores generated images against prompts.

- `grammar`: the prompt grammar, its parser, the train / held-out split and the builtin
  prompt sets (`toy:train`, `toy:eval`, ...);
- `render`: random scenes satisfying a prompt (the pretraining ground truth);
- `detect`: coloured blobs found in images and classified as shapes;
- `checker`: prompts scored against detections, and `ToyGenEvalReward`, the reward;
- `autoencoder`, `pretrain`: how the embedded toy VAE and flow were trained.
"""
