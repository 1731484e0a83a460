//! Model families, chosen by `model_type`.
