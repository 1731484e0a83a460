//! The one table of configuration keys: every key LLaMA-Factory 0.9.5 accepts (its five argument dataclasses:
//! model, data, training = HF `Seq2SeqTrainingArguments` of transformers 5.5.4, finetuning, generating) is
//! listed here exactly once, with LLaMA-Factory's default and what ferrotune does with it:
//!
//! - [`Support::Used`]: read into the [`Plan`](super::Plan); the doc says what it means.
//! - [`Support::Inert`]: accepted, and has no effect here for the reason given (e.g. `ddp_timeout` in a
//!   single-process tool). `ferrotune train --help` lists the reason; a non-default value is noted in the plan.
//! - [`UNIMPLEMENTED`]: LLaMA-Factory features ferrotune does not have. The default value is accepted (configs
//!   often spell out `deepspeed: null`); any other value is an error that says so, never a silent ignore.
//!
//! `tests/fixtures/golden/lf/keys.json` (written by `tools/golden/gen_lf.py` from the installed LLaMA-Factory)
//! checks that this table names every key and carries the same defaults.

/// Which LLaMA-Factory argument group a key belongs to (for `--help` grouping).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Model,
    Data,
    Training,
    Finetuning,
    Generating,
}

impl Section {
    pub fn title(self) -> &'static str {
        match self {
            Section::Model => "model",
            Section::Data => "data",
            Section::Training => "training",
            Section::Finetuning => "finetuning",
            Section::Generating => "generating",
        }
    }
}

/// The value type a key expects; values are checked against it when the plan reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int,
    Float,
    Str,
    /// A comma-separated string or a list of strings.
    List,
    /// Not checked (inert keys, dict-valued keys).
    Any,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Support {
    Used,
    /// Accepted with no effect; the text says why.
    Inert(&'static str),
}

/// One user-facing key.
#[derive(Debug)]
pub struct KeyDef {
    pub name: &'static str,
    pub section: Section,
    pub kind: Kind,
    /// LLaMA-Factory's default as a JSON literal (`null` when unset).
    pub default: &'static str,
    /// Whether `null` is a valid value (LLaMA-Factory's `Optional[...]` fields).
    pub nullable: bool,
    pub support: Support,
    pub doc: &'static str,
}

const fn used(name: &'static str, section: Section, kind: Kind, default: &'static str, doc: &'static str) -> KeyDef {
    let nullable = matches!(default.as_bytes(), b"null");
    KeyDef { name, section, kind, default, nullable, support: Support::Used, doc }
}

/// A used key that also accepts `null` although its default is not null.
const fn used_opt(
    name: &'static str,
    section: Section,
    kind: Kind,
    default: &'static str,
    doc: &'static str,
) -> KeyDef {
    KeyDef { name, section, kind, default, nullable: true, support: Support::Used, doc }
}

const fn inert(name: &'static str, section: Section, default: &'static str, why: &'static str) -> KeyDef {
    KeyDef { name, section, kind: Kind::Any, default, nullable: true, support: Support::Inert(why), doc: why }
}

use Kind::*;
use Section::*;

const NO_DOWNLOAD: &str = "ferrotune reads local files only; nothing is downloaded";
const NATIVE: &str = "ferrotune runs its own implementation of the model; no Python or remote code is involved";
const ONE_PROCESS: &str = "ferrotune trains in one process on one device; there is no distributed launcher";
const OWN_KERNELS: &str = "ferrotune picks its own kernels";
const NO_VIDEO: &str = "video input is not supported yet; rows with videos are reported by `data check`";
const OWN_PREPROCESS: &str = "ferrotune preprocesses natively in this process, without the `datasets` cache";
const OWN_ENGINE: &str = "ferrotune serves with its own engine (no vLLM or SGLang)";
const OWN_LOGGING: &str = "ferrotune writes its own progress, trainer_log.jsonl and trainer_state.json";

/// Keys that ferrotune reads or deliberately accepts.
pub static KEYS: &[KeyDef] = &[
    // ---- model ----
    used(
        "model_name_or_path",
        Model,
        Str,
        "null",
        "Local checkpoint folder (config.json, *.safetensors, tokenizer.json, preprocessor_config.json). Required.",
    ),
    used(
        "adapter_name_or_path",
        Model,
        List,
        "null",
        "LoRA adapter folder(s), comma-separated, applied on top of the base model (chat, api, export).",
    ),
    used(
        "image_max_pixels",
        Model,
        Int,
        "589824",
        "Images with more pixels are downsized (aspect kept) before the image processor, as LLaMA-Factory does.",
    ),
    used("image_min_pixels", Model, Int, "1024", "Images with fewer pixels are upsized before the image processor."),
    used(
        "infer_dtype",
        Model,
        Str,
        "\"auto\"",
        "Weight dtype for chat/api/export: auto, float16, bfloat16 or float32.",
    ),
    used(
        "quantization_bit",
        Model,
        Int,
        "null",
        "8: the frozen base matrices (linears, embedding / tied head, vision tower) are quantized to per-row int8 \
         at load, LoRA trains and serves on top in f32 (CPU; a quarter of f32's memory). 4 is not implemented.",
    ),
    used("export_dir", Model, Str, "null", "Where `export` writes the merged checkpoint."),
    used("export_size", Model, Int, "5", "Shard size of the exported safetensors, in GB."),
    inert("export_device", Model, "\"cpu\"", "export runs on the device ferrotune runs on"),
    inert("trust_remote_code", Model, "false", NATIVE),
    inert("use_fast_tokenizer", Model, "true", "tokenizer.json is always used"),
    inert("low_cpu_mem_usage", Model, "true", "weights are memory-mapped from safetensors"),
    inert("flash_attn", Model, "\"auto\"", OWN_KERNELS),
    inert("enable_liger_kernel", Model, "false", OWN_KERNELS),
    inert("use_v1_kernels", Model, "false", OWN_KERNELS),
    used(
        "disable_gradient_checkpointing",
        Model,
        Bool,
        "false",
        "Keep every layer's activations instead of recomputing them in the backward pass (faster, more memory). \
         Unset: keep activations within 512 MiB for the longest micro-batch (FERROTUNE_ACTIVATION_BUDGET_MB sets it), \
         those of the last layers that fit when not all do, and recompute the rest.",
    ),
    inert("use_reentrant_gc", Model, "true", "ferrotune manages activation memory itself"),
    inert("infer_backend", Model, "\"huggingface\"", OWN_ENGINE),
    inert("offload_folder", Model, "\"offload\"", "weights are memory-mapped; nothing is offloaded"),
    inert("use_kv_cache", Model, "true", "the engine always caches keys, values and recurrent state"),
    inert("cache_dir", Model, "null", NO_DOWNLOAD),
    inert("hf_hub_token", Model, "null", NO_DOWNLOAD),
    inert("ms_hub_token", Model, "null", NO_DOWNLOAD),
    inert("om_hub_token", Model, "null", NO_DOWNLOAD),
    inert("video_max_pixels", Model, "65536", NO_VIDEO),
    inert("video_min_pixels", Model, "256", NO_VIDEO),
    inert("video_fps", Model, "2.0", NO_VIDEO),
    inert("video_maxlen", Model, "128", NO_VIDEO),
    inert("vllm_maxlen", Model, "4096", OWN_ENGINE),
    inert("vllm_gpu_util", Model, "0.7", OWN_ENGINE),
    inert("vllm_enforce_eager", Model, "false", OWN_ENGINE),
    inert("vllm_max_lora_rank", Model, "32", OWN_ENGINE),
    inert("vllm_config", Model, "null", OWN_ENGINE),
    inert("sglang_maxlen", Model, "4096", OWN_ENGINE),
    inert("sglang_mem_fraction", Model, "0.7", OWN_ENGINE),
    inert("sglang_tp_size", Model, "-1", OWN_ENGINE),
    inert("sglang_config", Model, "null", OWN_ENGINE),
    inert("sglang_lora_backend", Model, "\"triton\"", OWN_ENGINE),
    // ---- data ----
    used(
        "template",
        Data,
        Str,
        "null",
        "Chat template: qwen3_5, qwen3_5_nothink, qwen3_vl, qwen3_vl_nothink, qwen2_vl, qwen, qwen3, \
         qwen3_nothink. When absent it is picked from the checkpoint.",
    ),
    used(
        "dataset",
        Data,
        List,
        "null",
        "Training dataset names from dataset_info.json (comma-separated), or file paths.",
    ),
    used("eval_dataset", Data, List, "null", "Evaluation dataset names (comma-separated). Not with `val_size`."),
    used("dataset_dir", Data, Str, "\"data\"", "Folder holding dataset_info.json and the data files."),
    used(
        "media_dir",
        Data,
        Str,
        "null",
        "Folder image paths are relative to (default: dataset_dir); a path not found there is used as given.",
    ),
    used(
        "cutoff_len",
        Data,
        Int,
        "2048",
        "Maximum tokens per sample. Text is truncated as LLaMA-Factory does; an image is never cut: such a \
         sample is dropped and reported.",
    ),
    used("train_on_prompt", Data, Bool, "false", "Also train on prompt tokens (default: answers only)."),
    used("mask_history", Data, Bool, "false", "Train on the last answer of each conversation only."),
    used("max_samples", Data, Int, "null", "Take only the first N rows of each dataset."),
    used(
        "val_size",
        Data,
        Float,
        "0.0",
        "Held-out evaluation split: a fraction in (0, 1) or a row count (> 1). The rows and their order are \
         LLaMA-Factory's (datasets' train_test_split: numpy's permutation seeded with `seed`).",
    ),
    used("mix_strategy", Data, Str, "\"concat\"", "How several datasets combine; only `concat` is implemented."),
    used(
        "packing",
        Data,
        Bool,
        "null",
        "Concatenates samples into rows of up to cutoff_len - 1 tokens (LLaMA-Factory's greedy knapsack), each row \
         one training sample. As in LLaMA-Factory the packed samples form one sequence: attention crosses them, \
         the Gated-DeltaNet states run on from one into the next and M-RoPE positions continue. See neat_packing.",
    ),
    used(
        "neat_packing",
        Data,
        Bool,
        "false",
        "Packing with every packed sample independent: block-diagonal attention, the Gated-DeltaNet conv and \
         recurrent states restarted at each sample, M-RoPE positions restarted; the same losses and gradients \
         as the samples one by one. Implies packing.",
    ),
    used("default_system", Data, Str, "null", "Replaces the template's default system prompt."),
    used_opt(
        "enable_thinking",
        Data,
        Bool,
        "true",
        "Reasoning templates (qwen3_5, qwen3_vl, qwen3): true trains the empty think block as part of the \
         answer, false puts it in the prompt, null for mixed data.",
    ),
    used("preserve_thinking", Data, Bool, "false", "Keep the thinking of earlier turns (reasoning templates)."),
    inert("ignore_pad_token_for_loss", Data, "true", "padding never enters the loss"),
    inert("overwrite_cache", Data, "false", OWN_PREPROCESS),
    inert("preprocessing_batch_size", Data, "1000", OWN_PREPROCESS),
    inert("preprocessing_num_workers", Data, "null", OWN_PREPROCESS),
    inert("data_shared_file_system", Data, "false", OWN_PREPROCESS),
    inert("buffer_size", Data, "16384", "only used by streaming, which is not implemented"),
    // ---- training (HF TrainingArguments) ----
    used("output_dir", Training, Str, "null", "Where checkpoints, logs and the adapter are written."),
    used(
        "overwrite_output_dir",
        Training,
        Bool,
        "false",
        "false: resume from the last checkpoint-N in output_dir (refuse if it holds weights but no checkpoint). \
         true: start fresh.",
    ),
    used("resume_from_checkpoint", Training, Str, "null", "Resume from this checkpoint-N folder."),
    used("do_train", Training, Bool, "false", "Train (required by `train`)."),
    used("do_eval", Training, Bool, "false", "Evaluate on eval_dataset / val_size."),
    used("per_device_train_batch_size", Training, Int, "8", "Samples per forward pass."),
    used("per_device_eval_batch_size", Training, Int, "8", "Samples per evaluation forward pass."),
    used("gradient_accumulation_steps", Training, Int, "1", "Forward passes per optimizer step."),
    used("learning_rate", Training, Float, "5e-05", "Peak learning rate (1e-4 and 1.0e-4 are both floats)."),
    used("weight_decay", Training, Float, "0.0", "AdamW decoupled weight decay."),
    used("adam_beta1", Training, Float, "0.9", "AdamW beta1."),
    used("adam_beta2", Training, Float, "0.999", "AdamW beta2."),
    used("adam_epsilon", Training, Float, "1e-08", "AdamW epsilon."),
    used("max_grad_norm", Training, Float, "1.0", "Gradient clipping norm (0 disables)."),
    used("num_train_epochs", Training, Float, "3.0", "Epochs (ignored when max_steps > 0)."),
    used("max_steps", Training, Int, "-1", "Total optimizer steps; overrides num_train_epochs when > 0."),
    used(
        "lr_scheduler_type",
        Training,
        Str,
        "\"linear\"",
        "Learning-rate schedule: linear, cosine, constant or constant_with_warmup.",
    ),
    used("warmup_steps", Training, Float, "0", "Warmup optimizer steps; a value below 1 is a fraction of the total."),
    used(
        "warmup_ratio",
        Training,
        Float,
        "null",
        "Warmup as a fraction of the total steps (same as warmup_steps < 1).",
    ),
    used("optim", Training, Str, "\"adamw_torch_fused\"", "Optimizer: AdamW (adamw_torch, adamw_torch_fused)."),
    used("logging_steps", Training, Float, "500", "Log every N optimizer steps (a value below 1 is a fraction)."),
    used("logging_first_step", Training, Bool, "false", "Also log the first step."),
    used("logging_strategy", Training, Str, "\"steps\"", "steps or no."),
    used("save_strategy", Training, Str, "\"steps\"", "steps or no."),
    used("save_steps", Training, Float, "500", "Write checkpoint-N every N optimizer steps (below 1: a fraction)."),
    used("save_total_limit", Training, Int, "null", "Keep at most this many checkpoints (default: all)."),
    used("save_only_model", Training, Bool, "false", "Checkpoints without optimizer state (cannot resume)."),
    used("eval_strategy", Training, Str, "\"no\"", "no, steps or epoch."),
    used("eval_steps", Training, Float, "null", "Evaluate every N steps (default: logging_steps)."),
    used("seed", Training, Int, "42", "Seed for initialization, shuffling and the validation split."),
    used("data_seed", Training, Int, "null", "Seed for data shuffling only (default: seed)."),
    used(
        "bf16",
        Training,
        Bool,
        "false",
        "bfloat16 compute (on the CPU: bf16 base weights as stored, frozen products in bf16, the rest in f32).",
    ),
    used("fp16", Training, Bool, "false", "float16 compute; not supported (use bf16)."),
    used("use_cpu", Training, Bool, "false", "Train on the CPU even when a GPU is present."),
    used("dataloader_drop_last", Training, Bool, "false", "Drop the last incomplete batch of each epoch."),
    used("report_to", Training, List, "\"none\"", "Experiment trackers; only `none` (ferrotune writes its own logs)."),
    used("include_num_input_tokens_seen", Training, Any, "\"no\"", "Log token counts and throughput (yes/no)."),
    inert("dataloader_num_workers", Training, "0", OWN_PREPROCESS),
    inert("dataloader_pin_memory", Training, "true", OWN_PREPROCESS),
    inert("dataloader_persistent_workers", Training, "false", OWN_PREPROCESS),
    inert("dataloader_prefetch_factor", Training, "null", OWN_PREPROCESS),
    inert(
        "remove_unused_columns",
        Training,
        "true",
        "LLaMA-Factory forces it off; ferrotune keeps every column it needs",
    ),
    inert("label_names", Training, "null", "the labels are always `labels`"),
    inert("ddp_timeout", Training, "1800", ONE_PROCESS),
    inert("ddp_find_unused_parameters", Training, "null", ONE_PROCESS),
    inert("ddp_bucket_cap_mb", Training, "null", ONE_PROCESS),
    inert("ddp_broadcast_buffers", Training, "null", ONE_PROCESS),
    inert("ddp_backend", Training, "null", ONE_PROCESS),
    inert("local_rank", Training, "-1", ONE_PROCESS),
    inert("log_on_each_node", Training, "true", ONE_PROCESS),
    inert("save_on_each_node", Training, "false", ONE_PROCESS),
    inert("average_tokens_across_devices", Training, "true", ONE_PROCESS),
    inert("log_level", Training, "\"passive\"", OWN_LOGGING),
    inert("log_level_replica", Training, "\"warning\"", OWN_LOGGING),
    inert("logging_nan_inf_filter", Training, "true", OWN_LOGGING),
    inert("logging_dir", Training, "null", OWN_LOGGING),
    inert("disable_tqdm", Training, "null", OWN_LOGGING),
    inert("run_name", Training, "null", OWN_LOGGING),
    inert("project", Training, "\"huggingface\"", OWN_LOGGING),
    inert("trackio_space_id", Training, "\"trackio\"", OWN_LOGGING),
    inert("skip_memory_metrics", Training, "true", OWN_LOGGING),
    inert("debug", Training, "\"\"", OWN_LOGGING),
    inert("tf32", Training, "null", OWN_KERNELS),
    inert("torch_compile", Training, "false", OWN_KERNELS),
    inert("torch_compile_backend", Training, "null", OWN_KERNELS),
    inert("torch_compile_mode", Training, "null", OWN_KERNELS),
    inert("use_liger_kernel", Training, "false", OWN_KERNELS),
    inert("liger_kernel_config", Training, "null", OWN_KERNELS),
    inert("torch_empty_cache_steps", Training, "null", OWN_KERNELS),
    inert("gradient_checkpointing", Training, "false", "ferrotune manages activation memory itself"),
    inert("gradient_checkpointing_kwargs", Training, "null", "ferrotune manages activation memory itself"),
    inert("use_cache", Training, "false", "training never uses a generation cache"),
    inert("enable_torch_profiler", Training, "false", NATIVE),
    inert("profiler_output_dir", Training, "null", NATIVE),
    inert("profiler_wait_steps", Training, "1", NATIVE),
    inert("profiler_warmup_steps", Training, "1", NATIVE),
    inert("profiler_active_steps", Training, "1", NATIVE),
    inert("profiler_repeat", Training, "1", NATIVE),
    inert("profiler_record_shapes", Training, "true", NATIVE),
    inert("profiler_profile_memory", Training, "true", NATIVE),
    inert("profiler_with_stack", Training, "true", NATIVE),
    inert("profile_modules", Training, "null", NATIVE),
    // ---- finetuning ----
    used("stage", Finetuning, Str, "\"sft\"", "Training stage; ferrotune implements sft."),
    used(
        "finetuning_type",
        Finetuning,
        Str,
        "\"lora\"",
        "Fine-tuning method: lora (adapters on lora_target) or full (every language-model weight).",
    ),
    used("lora_rank", Finetuning, Int, "8", "LoRA rank r."),
    used("lora_alpha", Finetuning, Int, "null", "LoRA alpha; default 2 x lora_rank. Scale = alpha / r."),
    used("lora_dropout", Finetuning, Float, "0.0", "Dropout on the LoRA input."),
    used(
        "lora_target",
        Finetuning,
        List,
        "\"all\"",
        "Module name suffixes to adapt (comma-separated), or `all` (every linear layer of the language model).",
    ),
    used("use_rslora", Finetuning, Bool, "false", "Rank-stabilised LoRA: scale = alpha / sqrt(r)."),
    used("freeze_vision_tower", Finetuning, Bool, "true", "Keep the vision tower frozen (no LoRA there)."),
    used("freeze_multi_modal_projector", Finetuning, Bool, "true", "Keep the vision merger frozen."),
    used("freeze_language_model", Finetuning, Bool, "false", "Keep the language model frozen."),
    used("plot_loss", Finetuning, Bool, "false", "Write training_loss.png at the end."),
    used("compute_accuracy", Finetuning, Bool, "false", "Report token accuracy in evaluation."),
    used("disable_shuffling", Finetuning, Bool, "false", "Train on the rows in file order."),
    inert("include_effective_tokens_per_second", Finetuning, "false", "throughput is always in the progress line"),
    // ---- generating ----
    used("do_sample", Generating, Bool, "true", "Sample (false: greedy)."),
    used("temperature", Generating, Float, "0.95", "Sampling temperature (0: greedy)."),
    used("top_p", Generating, Float, "0.7", "Nucleus sampling threshold."),
    used("top_k", Generating, Int, "50", "Top-k sampling."),
    used("num_beams", Generating, Int, "1", "Beam search width; only 1 is implemented."),
    used("max_length", Generating, Int, "1024", "Maximum prompt + answer tokens."),
    used("max_new_tokens", Generating, Int, "1024", "Maximum answer tokens."),
    used("repetition_penalty", Generating, Float, "1.0", "Penalty for repeated tokens (1.0: none)."),
    inert("length_penalty", Generating, "1.0", "only used by beam search"),
    used("skip_special_tokens", Generating, Bool, "true", "Drop special tokens from the decoded answer."),
];

/// A LLaMA-Factory feature ferrotune does not implement, and the keys that turn it on.
pub struct Unimplemented {
    pub feature: &'static str,
    /// What to do instead.
    pub hint: &'static str,
    /// (key, LLaMA-Factory default as a JSON literal)
    pub keys: &'static [(&'static str, &'static str)],
}

pub static UNIMPLEMENTED: &[Unimplemented] = &[
    Unimplemented {
        feature: "4-bit and other quantization methods (bitsandbytes NF4/FP4, HQQ, EETQ)",
        hint: "remove the key; ferrotune quantizes the base to per-row int8 with quantization_bit: 8",
        keys: &[
            ("quantization_method", "\"bnb\""),
            ("quantization_type", "\"nf4\""),
            ("double_quantization", "true"),
            ("quantization_device_map", "null"),
            ("upcast_layernorm", "false"),
            ("upcast_lmhead_output", "false"),
        ],
    },
    Unimplemented {
        feature: "distributed training (DeepSpeed, FSDP, Ray, Megatron)",
        hint: "remove the key; ferrotune trains on one device",
        keys: &[
            ("deepspeed", "null"),
            ("fsdp", "null"),
            ("fsdp_config", "null"),
            ("accelerator_config", "null"),
            ("parallelism_config", "null"),
            ("ray_num_workers", "1"),
            ("ray_init_kwargs", "null"),
            ("master_addr", "null"),
            ("master_port", "null"),
            ("use_mca", "false"),
            ("use_hyper_parallel", "false"),
            ("hyper_parallel_args", "null"),
            ("use_kt", "false"),
            ("kt_weight_path", "null"),
            ("kt_expert_checkpoint_path", "null"),
            ("kt_use_lora_experts", "null"),
            ("kt_lora_expert_num", "null"),
            ("kt_lora_expert_intermediate_size", "null"),
        ],
    },
    Unimplemented {
        feature: "FP8 and full-precision evaluation switches",
        hint: "remove the key",
        keys: &[
            ("fp8", "false"),
            ("fp8_backend", "\"auto\""),
            ("fp8_enable_fsdp_float8_all_gather", "false"),
            ("bf16_full_eval", "false"),
            ("fp16_full_eval", "false"),
            ("pure_bf16", "false"),
        ],
    },
    Unimplemented {
        feature: "other fine-tuning methods (full, freeze, OFT, DoRA, PiSSA, LoRA+, GaLore, APOLLO, BAdam, LLaMA Pro, \
                  Adam-mini, Muon)",
        hint: "ferrotune implements plain LoRA (finetuning_type: lora, optionally use_rslora)",
        keys: &[
            ("freeze_trainable_layers", "2"),
            ("freeze_trainable_modules", "\"all\""),
            ("freeze_extra_modules", "null"),
            ("additional_target", "null"),
            ("module_dropout", "0.0"),
            ("oft_rank", "0"),
            ("oft_block_size", "32"),
            ("oft_target", "\"all\""),
            ("create_new_adapter", "false"),
            ("loraplus_lr_ratio", "null"),
            ("loraplus_lr_embedding", "1e-06"),
            ("use_dora", "false"),
            ("pissa_init", "false"),
            ("pissa_iter", "16"),
            ("pissa_convert", "false"),
            ("use_galore", "false"),
            ("galore_target", "\"all\""),
            ("galore_rank", "16"),
            ("galore_update_interval", "200"),
            ("galore_scale", "2.0"),
            ("galore_proj_type", "\"std\""),
            ("galore_layerwise", "false"),
            ("use_apollo", "false"),
            ("apollo_target", "\"all\""),
            ("apollo_rank", "16"),
            ("apollo_update_interval", "200"),
            ("apollo_scale", "32.0"),
            ("apollo_proj", "\"random\""),
            ("apollo_proj_type", "\"std\""),
            ("apollo_scale_type", "\"channel\""),
            ("apollo_layerwise", "false"),
            ("apollo_scale_front", "false"),
            ("use_badam", "false"),
            ("badam_mode", "\"layer\""),
            ("badam_start_block", "null"),
            ("badam_switch_mode", "\"ascending\""),
            ("badam_switch_interval", "50"),
            ("badam_update_ratio", "0.05"),
            ("badam_mask_mode", "\"adjacent\""),
            ("badam_verbose", "0"),
            ("use_llama_pro", "false"),
            ("use_adam_mini", "false"),
            ("use_muon", "false"),
            ("optim_args", "null"),
            ("optim_target_modules", "null"),
        ],
    },
    Unimplemented {
        feature: "preference and reinforcement stages (rm, ppo, dpo, kto, orpo, simpo) and loss variants",
        hint: "ferrotune implements stage: sft",
        keys: &[
            ("pref_beta", "0.1"),
            ("pref_ftx", "0.0"),
            ("pref_bco_weight", "0.0"),
            ("pref_loss", "\"sigmoid\""),
            ("dpo_label_smoothing", "0.0"),
            ("kto_chosen_weight", "1.0"),
            ("kto_rejected_weight", "1.0"),
            ("simpo_gamma", "0.5"),
            ("ppo_buffer_size", "1"),
            ("ppo_epochs", "4"),
            ("ppo_score_norm", "false"),
            ("ppo_target", "6.0"),
            ("ppo_whiten_rewards", "false"),
            ("ref_model", "null"),
            ("ref_model_adapters", "null"),
            ("ref_model_quantization_bit", "null"),
            ("reward_model", "null"),
            ("reward_model_adapters", "null"),
            ("reward_model_quantization_bit", "null"),
            ("reward_model_type", "\"lora\""),
            ("ld_alpha", "null"),
            ("use_dft_loss", "false"),
            ("use_asft_loss", "false"),
            ("asft_alpha", "0.1"),
            ("use_eaft_loss", "false"),
            ("eaft_alpha", "1.0"),
            ("label_smoothing_factor", "0.0"),
            ("neftune_noise_alpha", "null"),
        ],
    },
    Unimplemented {
        feature: "vocabulary and architecture changes (new tokens, RoPE scaling, S2-attn, mixture of depths, Unsloth)",
        hint: "remove the key; ferrotune trains the checkpoint's architecture as it is",
        keys: &[
            ("adapter_folder", "null"),
            ("resize_vocab", "false"),
            ("split_special_tokens", "false"),
            ("add_tokens", "null"),
            ("add_special_tokens", "null"),
            ("new_special_tokens_config", "null"),
            ("init_special_tokens", "\"noise_init\""),
            ("rope_scaling", "null"),
            ("shift_attn", "false"),
            ("mixture_of_depths", "null"),
            ("use_unsloth", "false"),
            ("use_unsloth_gc", "false"),
            ("moe_aux_loss_coef", "null"),
            ("train_from_scratch", "false"),
            ("print_param_status", "false"),
        ],
    },
    Unimplemented {
        feature: "other media (video, audio, pan-and-scan crops)",
        hint: "remove the key; ferrotune reads images",
        keys: &[
            ("image_do_pan_and_scan", "false"),
            ("crop_to_patches", "false"),
            ("use_audio_in_video", "false"),
            ("audio_sampling_rate", "16000"),
        ],
    },
    Unimplemented {
        feature: "Hub access (revisions, push, hub ids)",
        hint: "download the checkpoint or dataset first and point the config at the local folder",
        keys: &[
            ("model_revision", "\"main\""),
            ("push_to_hub", "false"),
            ("hub_token", "null"),
            ("hub_private_repo", "null"),
            ("hub_model_id", "null"),
            ("hub_strategy", "\"every_save\""),
            ("hub_always_push", "false"),
            ("hub_revision", "null"),
            ("export_hub_model_id", "null"),
        ],
    },
    Unimplemented {
        feature: "export quantization and legacy formats",
        hint: "ferrotune exports merged safetensors",
        keys: &[
            ("export_quantization_bit", "null"),
            ("export_quantization_dataset", "null"),
            ("export_quantization_nsamples", "128"),
            ("export_quantization_maxlen", "1024"),
            ("export_legacy_format", "false"),
        ],
    },
    Unimplemented {
        feature: "dataset streaming, interleaving and tokenized caches",
        hint: "remove the key; datasets are read in full and concatenated",
        keys: &[
            ("streaming", "false"),
            ("interleave_probs", "null"),
            ("tokenized_path", "null"),
            ("eval_on_each_dataset", "false"),
            ("tool_format", "null"),
            ("train_sampling_strategy", "\"random\""),
            ("length_column_name", "\"length\""),
            ("sortish_sampler", "false"),
        ],
    },
    Unimplemented {
        feature: "prediction with generation, best-model selection and evaluation options",
        hint: "evaluation computes the loss (and accuracy with compute_accuracy)",
        keys: &[
            ("do_predict", "false"),
            ("predict_with_generate", "false"),
            ("generation_max_length", "null"),
            ("generation_num_beams", "null"),
            ("generation_config", "null"),
            ("eval_num_beams", "null"),
            ("load_best_model_at_end", "false"),
            ("metric_for_best_model", "null"),
            ("greater_is_better", "null"),
            ("early_stopping_steps", "null"),
            ("eval_delay", "0"),
            ("prediction_loss_only", "false"),
            ("eval_on_start", "false"),
            ("eval_do_concat_batches", "true"),
            ("eval_use_gather_object", "false"),
            ("eval_accumulation_steps", "null"),
            ("include_for_metrics", "[]"),
            ("batch_eval_metrics", "false"),
        ],
    },
    Unimplemented {
        feature: "trainer switches",
        hint: "remove the key",
        keys: &[
            ("lr_scheduler_kwargs", "null"),
            ("auto_find_batch_size", "false"),
            ("ignore_data_skip", "false"),
            ("restore_callback_states_from_checkpoint", "false"),
            ("full_determinism", "false"),
            ("enable_jit_checkpoint", "false"),
        ],
    },
    Unimplemented {
        feature: "SwanLab tracking",
        hint: "ferrotune writes trainer_log.jsonl and training_loss.png",
        keys: &[
            ("use_swanlab", "false"),
            ("swanlab_project", "\"llamafactory\""),
            ("swanlab_workspace", "null"),
            ("swanlab_run_name", "null"),
            ("swanlab_mode", "\"cloud\""),
            ("swanlab_api_key", "null"),
            ("swanlab_logdir", "null"),
            ("swanlab_lark_webhook_url", "null"),
            ("swanlab_lark_secret", "null"),
        ],
    },
];

/// The definition of a key ferrotune reads or accepts.
pub fn find(name: &str) -> Option<&'static KeyDef> {
    KEYS.iter().find(|k| k.name == name)
}

/// The unimplemented feature a key belongs to, with that key's LLaMA-Factory default.
pub fn find_unimplemented(name: &str) -> Option<(&'static Unimplemented, &'static str)> {
    UNIMPLEMENTED.iter().find_map(|u| u.keys.iter().find(|(k, _)| *k == name).map(|(_, d)| (u, *d)))
}

/// Every key name LLaMA-Factory accepts, for "did you mean" suggestions.
pub fn all_names() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|k| k.name).chain(UNIMPLEMENTED.iter().flat_map(|u| u.keys.iter().map(|(k, _)| *k)))
}

/// The key listing `ferrotune train --help` prints: used keys with defaults and docs, by section, then the
/// accepted-but-inert keys and the unimplemented features.
pub fn help_text() -> String {
    let mut out = String::from("CONFIG KEYS (LLaMA-Factory names and defaults):\n");
    for section in [Model, Data, Training, Finetuning, Generating] {
        out.push_str(&format!("\n  [{}]\n", section.title()));
        for k in KEYS.iter().filter(|k| k.section == section && k.support == Support::Used) {
            out.push_str(&format!("    {} (default {})\n        {}\n", k.name, k.default, k.doc));
        }
    }
    out.push_str("\n  Accepted with no effect:\n");
    for k in KEYS {
        if let Support::Inert(why) = k.support {
            out.push_str(&format!("    {}: {}\n", k.name, why));
        }
    }
    out.push_str("\n  Not implemented (an error unless left at LLaMA-Factory's default):\n");
    for u in UNIMPLEMENTED {
        let names: Vec<&str> = u.keys.iter().map(|(k, _)| *k).collect();
        out.push_str(&format!("    {}: {}\n", u.feature, names.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_defined_once() {
        let mut names: Vec<&str> = all_names().collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "a key is listed twice");
    }

    #[test]
    fn defaults_are_json() {
        for k in KEYS {
            assert!(serde_json::from_str::<serde_json::Value>(k.default).is_ok(), "{}", k.name);
        }
        for u in UNIMPLEMENTED {
            for (k, d) in u.keys {
                assert!(serde_json::from_str::<serde_json::Value>(d).is_ok(), "{k}");
            }
        }
    }
}
