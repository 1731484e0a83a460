//! The binary's one integration-test binary: runs the built `ferrotune` as users do.

mod cli;
mod python;
mod readme;
mod recipes;
mod serve;
