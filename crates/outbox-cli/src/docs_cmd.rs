//! `outbox completions SHELL` and `outbox man`: generated from the clap definition, so they list
//! exactly the commands and options this binary has (the `aws` commands only when built with the
//! `aws` feature).

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::config_cmd::write_stdout;
use crate::Cli;

pub(crate) fn completions(shell: clap_complete::Shell) -> Result<()> {
    let mut command = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "outbox", &mut script);
    write_stdout(&String::from_utf8(script).context("the completion script is not UTF-8")?)
}

pub(crate) fn man() -> Result<()> {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut page)
        .context("rendering the man page")?;
    write_stdout(&String::from_utf8(page).context("the man page is not UTF-8")?)
}
