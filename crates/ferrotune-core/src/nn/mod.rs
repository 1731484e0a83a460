//! Building blocks with backward passes that candle's fused ops lack.
