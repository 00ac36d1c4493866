"""Models: the open_clip backbone, text classifiers, heads, parameter-efficient fine-tuning."""
