//! Checkpoint directories: config.json and safetensors shards.
