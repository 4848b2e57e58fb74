"""Language-model pretraining study: byte-level data, GPT-2/LLaMA presets, a trainer that writes HF
checkpoint folders, and the study that applies extramerge to them (predicted vs measured gain)."""
