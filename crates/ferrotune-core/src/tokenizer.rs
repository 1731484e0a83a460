//! tokenizer.json and the checkpoint's chat template.
