//! `cachevol bench`: restore and commit measured against tar+zstd on the same trees.

use clap::Args;

use super::output::Out;
use super::Global;
use crate::engine::Error;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Trees to measure.
    pub trees: Vec<std::path::PathBuf>,
}

pub async fn run(_g: &Global, _args: BenchArgs, _out: &Out) -> Result<i32, Error> {
    Err(Error::Lock("bench: being written".into()))
}
