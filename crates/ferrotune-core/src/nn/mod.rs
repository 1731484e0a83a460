//! Building blocks for the models, written only with candle ops that have a backward pass.
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `RmsNorm`/`LayerNorm::forward` and `rope*` silently drop
//! gradients (they are built with `apply_op*_no_bwd`), so a model made of them trains nothing while reporting
//! success. Everything here is a composite of differentiable ops (or a custom op with an analytic backward),
//! and the tests check gradients against finite differences.

pub mod amx;
pub mod attention;
pub mod dpbf16;
pub mod frozen;
pub mod fused;
pub mod linear;
pub mod mixed;
pub mod ops;
pub mod param;
pub mod stream;

pub use linear::{with_row_adapters, AdapterWeights, Linear, Lora, LoraMatrices, RowAdapter};
pub use param::{linears, make_trainable, params, state_dict, Module, Node, Param, Stored};
